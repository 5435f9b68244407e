"""Input transforms for patch encoders, applied on the model's device to uint8 batches.

Patches travel from the reader workers as uint8 `[B, H, W, 3]` (4x smaller than float32, cheap to pin and
copy); resizing, centre cropping and normalisation happen here, on the GPU when there is one.

The resize emulates the PIL pipeline the reference transforms use (`Resize(shorter side, bicubic)`,
`CenterCrop`, `ToTensor`, `Normalize`): antialiased interpolation, then rounding and clamping to the
0..255 range as PIL's uint8 output does. The only remaining difference is the bicubic kernel
(torch uses a = -0.75, PIL a = -0.5): a few grey levels at edges after upsampling, none when the patch
already has the model's input size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TransformSpec:
    """A resize-shorter-side, centre-crop, normalise transform; recorded in every feature store."""

    name: str
    size: int  # model input side after the centre crop
    resize: int  # shorter side after resizing (>= size); CLIP-style transforms use resize == size
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TransformSpec":
        return cls(
            name=d["name"],
            size=int(d["size"]),
            resize=int(d["resize"]),
            interpolation=d.get("interpolation", "bicubic"),
            mean=tuple(d["mean"]),  # type: ignore[arg-type]
            std=tuple(d["std"]),  # type: ignore[arg-type]
        )


TRANSFORMS: dict[str, TransformSpec] = {
    # CONCH's own `create_model_from_pretrained` transform: Resize(448, bicubic), CenterCrop(448), OpenAI mean/std.
    "conch_official": TransformSpec("conch_official", size=448, resize=448),
    # SlideChat's released features: CONCH on 224 px patches at 20x, same normalisation, no upsampling.
    "slidechat": TransformSpec("slidechat", size=224, resize=224),
    # ImageNet-pretrained CNNs (resnet50_trunc as in CLAM/TRIDENT).
    "imagenet": TransformSpec("imagenet", size=224, resize=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD),
}


def get_transform(name_or_spec: str | TransformSpec) -> TransformSpec:
    """A registered transform by name (or a spec passed through)."""
    if isinstance(name_or_spec, TransformSpec):
        return name_or_spec
    try:
        return TRANSFORMS[name_or_spec]
    except KeyError:
        raise ValueError(
            f"unknown transform {name_or_spec!r}; choose one of {sorted(TRANSFORMS)} (option --transform)"
        ) from None


class Preprocess(nn.Module):
    """uint8 `[B, H, W, 3]` (any device) -> normalised float `[B, 3, size, size]` on `device`."""

    def __init__(self, spec: TransformSpec) -> None:
        super().__init__()
        if spec.interpolation not in {"bicubic", "bilinear"}:
            raise ValueError(f"transform {spec.name}: unsupported interpolation {spec.interpolation!r}")
        if spec.resize < spec.size:
            raise ValueError(f"transform {spec.name}: resize {spec.resize} is smaller than the crop {spec.size}")
        self.spec = spec
        # Buffers follow the module to its device; persistent=False keeps them out of state dicts.
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(spec.std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised float `[B, 3, S, S]`; when no resizing is needed it is written into `out` if given
        (any memory format, e.g. channels_last: reused batch buffers, one pass over the pixels)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        images = images.to(self.scale.device, non_blocking=True)
        h, w = images.shape[1:3]
        if min(h, w) == self.spec.resize and (h, w) == (self.spec.size, self.spec.size):
            # (x - mean*255) / (std*255) straight from uint8 NHWC: the same float32 operations as below.
            x = torch.sub(images.permute(0, 3, 1, 2), self.shift, out=out)
            return x.mul_(self.scale)
        # Contiguous NCHW first: broadcasting over a channels-last view is several times slower on CPU.
        x = images.permute(0, 3, 1, 2).contiguous().float()
        x = resize_shorter_center_crop(x, self.spec.resize, self.spec.size, self.spec.interpolation)
        return x.sub_(self.shift).mul_(self.scale)


def resize_shorter_center_crop(x: torch.Tensor, resize: int, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Float `[B, 3, H, W]` in 0..255: shorter side to `resize` (PIL-like, antialiased), then centre crop `size`."""
    h, w = x.shape[-2:]
    if min(h, w) != resize:
        # torchvision's Resize(int) rule: the shorter side becomes `resize`, the longer keeps the aspect ratio.
        if h <= w:
            nh, nw = resize, int(resize * w / h)
        else:
            nh, nw = int(resize * h / w), resize
        x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False, antialias=True)
        x = x.clamp_(0.0, 255.0).round_()  # PIL resamples uint8 -> uint8
        h, w = nh, nw
    if (h, w) != (size, size):
        # torchvision CenterCrop offsets: round((H - size) / 2).
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
    return x


def area_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 `[B, C, H, W]` -> `[B, C, size, size]` by area averaging, as OpenCV's INTER_AREA shrinks.

    Integer factors are exact: 2x uses OpenCV's `(sum + 2) >> 2`, larger factors its float sum times
    1/k² rounded half to even. Other factors use OpenCV's fractional cell weights as two matrix products
    (float64); OpenCV sums in float32, so a value lying within float32 rounding of .5 can differ by one.
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h % size == 0 and w % size == 0 and h // size == w // size:
        k = h // size
        s = torch.zeros((*x.shape[:-2], size, size), dtype=torch.int32, device=x.device)
        for dy in range(k):  # k² strided adds: fast on CPU and GPU alike (a strided sum() is not on CPU)
            for dx in range(k):
                s += x[..., dy::k, dx::k]
        if k == 2:
            return ((s + 2) >> 2).to(torch.uint8)
        return (s.float() * (1.0 / (k * k))).round_().clamp_(0, 255).to(torch.uint8)
    wy = _area_weights(h, size, x.device)
    wx = _area_weights(w, size, x.device)
    out = wy @ x.double() @ wx.T
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _area_weights(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """OpenCV's INTER_AREA weights (computeResizeAreaTab) as an `[n_out, n_in]` float64 matrix."""
    scale = n_in / n_out
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    for d in range(n_out):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, n_in - f1)
        s1, s2 = math.ceil(f1), math.floor(f2)
        s2 = min(s2, n_in - 1)
        s1 = min(s1, s2)
        if s1 - f1 > 1e-3:
            weights[d, s1 - 1] = (s1 - f1) / cell
        weights[d, s1:s2] = 1.0 / cell
        if f2 - s2 > 1e-3:
            weights[d, s2] = min(min(f2 - s2, 1.0), cell) / cell
    return weights.to(device)
