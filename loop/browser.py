"""A real browser for the FiftyOne App: Debian's Chromium through Debian's chromedriver, headless.

What the tests drive and what the README's screenshots come from (``python -m loop.browser``).
Selenium Manager is forbidden to run: it would download a driver or a browser, and nothing may.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def browser(tmp: Path):
    """Debian's Chromium through Debian's chromedriver; Selenium Manager may not run (no downloads)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common import selenium_manager

    def forbidden(*_args, **_kwargs):
        raise AssertionError("Selenium Manager was asked for a driver or browser: it would download")

    for name in ("binary_paths", "_run"):  # the look-up, and the subprocess that would download
        assert hasattr(selenium_manager.SeleniumManager, name), f"Selenium changed: no SeleniumManager.{name}"
        setattr(selenium_manager.SeleniumManager, name, forbidden)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,900",
        f"--user-data-dir={tempfile.mkdtemp(dir=tmp)}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def wait_text(driver, text: str, timeout: float = 90.0) -> None:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in driver.find_element(By.TAG_NAME, "body").text:
            return
        time.sleep(0.5)
    raise AssertionError(
        f"{text!r} never appeared on the page; it shows:\n{driver.find_element(By.TAG_NAME, 'body').text[:2000]}"
    )


def dismiss_popups(driver) -> None:
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.XPATH, "//button[normalize-space(.)='Dismiss']"):
        driver.execute_script("arguments[0].click()", button)


def screenshot_view(app_url: str, dataset: str, view: str, out: Path, samples: int) -> Path:
    """Open a saved view in the App, wait until its grid shows its samples, write a screenshot."""
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory() as tmp:
        driver = browser(Path(tmp))
        try:
            driver.get(f"{app_url}/datasets/{dataset}?view={view}")
            wait_text(driver, f"{samples} samples")
            for _ in range(120):
                if len(driver.find_elements(By.CSS_SELECTOR, '[data-cy="looker"]')) >= min(samples, 8):
                    break
                time.sleep(0.5)
            time.sleep(3)  # let the tiles draw their images and boxes
            dismiss_popups(driver)
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshot a saved view of the FiftyOne App in a real browser.")
    parser.add_argument("--app", required=True, help="The App's URL (edgeloop demo --open-app prints it).")
    parser.add_argument("--dataset", default="edgeloop-inbox")
    parser.add_argument("--view", default="batch-001")
    parser.add_argument("--samples", type=int, required=True, help="Samples the view holds (waited for).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(screenshot_view(args.app.rstrip("/"), args.dataset, args.view, args.out, args.samples))


if __name__ == "__main__":
    main()
