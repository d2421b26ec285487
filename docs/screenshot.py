"""Make docs/review.png: the review page of a trained run, in headless Chromium (Debian's chromium and chromedriver).

python docs/screenshot.py --model demo-arcface --photos data/demo/test --n 3
python docs/screenshot.py --model demo-arcface --photos data/demo/test/00d6a101.jpg data/demo/test/01ea2f30.jpg data/demo/test/02c91c2c.jpg   # what README shows
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from whalefast.review.app import create_app


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-arcface")
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--photos", nargs="+", default=["data/demo/test"], help="photos or folders of photos")
    parser.add_argument("--n", type=int, default=3, help="photos to upload")
    parser.add_argument("--out", default=str(Path(__file__).parent / "review.png"))
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    server = uvicorn.Server(uvicorn.Config(create_app(Path(args.models_dir) / args.model), host="127.0.0.1", port=args.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1950"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    browser.implicitly_wait(20)  # find_element waits for the next page after a click
    try:
        browser.get(f"http://127.0.0.1:{args.port}/")
        photos = [p for arg in map(Path, args.photos) for p in (sorted(arg.iterdir()) if arg.is_dir() else [arg])][: args.n]
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p.resolve()) for p in photos))
        browser.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
        browser.find_element(By.ID, "start").click()
        time.sleep(1)
        browser.save_screenshot(args.out)
    finally:
        browser.quit()
        server.should_exit = True
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
