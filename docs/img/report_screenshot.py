"""Screenshots of a Snakemake report (headless Chromium + Selenium): one per path through its menu.

    snakemake --report report.html
    python docs/img/report_screenshot.py report.html --out docs/img/report-table.png \
        --path "2. Patches and features" "per-slide patches and extraction throughput"
    python docs/img/report_screenshot.py report.html --out docs/img/report-slide.png \
        --path "1. Slides" "Slide overview" demo-000

Each --path item is clicked in turn (a menu entry, or a result's row: its eye icon opens it). Needs the Debian
packages chromium and chromium-driver and the `test` extra (selenium).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By

from serve_screenshot import headless_chromium, save_palette_png  # this folder is on sys.path when run


def open_path(driver: webdriver.Chrome, steps: list[str]) -> None:
    """Click each menu entry by its text; a result row (a table row naming it) is opened with its eye icon."""
    for step in steps:
        target = driver.find_element(By.XPATH, f"//*[normalize-space(text())='{step}']")
        row = target.find_elements(By.XPATH, "./ancestor::tr[1]")
        eye = row[0].find_elements(By.CSS_SELECTOR, "a[iconname='eye']") if row else []
        (eye[0] if eye else target).click()
        time.sleep(1.5)  # the report renders the result (an embedded image or page) after the click


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="report.html written by `snakemake --report`")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--path", nargs="+", required=True, help="menu entries / result names to click, in order")
    p.add_argument("--size", default="1400,900", help="window width,height in px")
    p.add_argument("--colors", type=int, default=256, help="palette size of the saved PNG (0: full colour)")
    a = p.parse_args()
    driver = headless_chromium(a.size)
    try:
        driver.get(Path(a.report).resolve().as_uri())
        time.sleep(2.0)
        open_path(driver, a.path)
        driver.save_screenshot(a.out)
    finally:
        driver.quit()
    if a.colors:
        save_palette_png(a.out, a.colors)


if __name__ == "__main__":
    main()
