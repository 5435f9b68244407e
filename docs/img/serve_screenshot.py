"""Screenshot of a running `slidechat serve` page after asking one question (headless Chromium + Selenium).

    slidechat serve --model results/models/stage2 --slides results/demo/slides/labels.csv --results results &
    python docs/img/serve_screenshot.py --slide demo-000 --out docs/img/serve.png

Needs the Debian packages chromium and chromium-driver and the `test` extra (selenium).
"""

from __future__ import annotations

import argparse
import shutil
import time

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

DEMO_QUESTION = ("Which tissue type is shown in this whole slide image?\nA. Fibrous stroma\nB. Lymphoid tissue\n"
                 "C. Adenocarcinoma\nD. Necrosis")


def headless_chromium(size: str) -> webdriver.Chrome:
    """Debian's chromium through its chromedriver, headless, with a window of `size` ("width,height")."""
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={size}", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))


def save_palette_png(path: str, colors: int) -> None:
    """Rewrite a screenshot with `colors` colours: a third of the size, small enough for the repository."""
    image = Image.open(path).convert("RGB")
    image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/")
    p.add_argument("--slide", required=True)
    p.add_argument("--question", default=DEMO_QUESTION)
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="1500,860", help="window width,height in px")
    p.add_argument("--colors", type=int, default=256, help="palette size of the saved PNG (0: full colour)")
    a = p.parse_args()
    driver = headless_chromium(a.size)
    try:
        wait = WebDriverWait(driver, 600)
        driver.get(a.url)
        wait.until(lambda d: d.execute_script("return document.body.dataset.loaded") == "1")
        driver.find_element(By.CSS_SELECTOR, f'#slide-list li[data-id="{a.slide}"]').click()
        wait.until(lambda d: d.execute_script("return viewer.world.getItemAt(0) && viewer.world.getItemAt(0).getFullyLoaded()"))
        driver.execute_script("document.getElementById('question').value = arguments[0]", a.question)
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages li.assistant .top-patches"))
        time.sleep(1.0)  # let the viewer finish its animation
        driver.save_screenshot(a.out)
    finally:
        driver.quit()
    if a.colors:
        save_palette_png(a.out, a.colors)


if __name__ == "__main__":
    main()
