"""The page at / of the hardened server, in a real browser (Debian's chromium through Selenium)
against a real served model: token flow, an upload, the top classes, Grad-CAM for the top class and
a clicked one, the model card, a refused file, a phone-sized window. Screenshots are written to
test-artifacts/page/ at the repository root for a person to look at."""

import base64
import shutil
from pathlib import Path

import pytest
import requests

from pipeline.model.imaging import encode_png
from tests.test_protocols import real_image

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "page"


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1100,1400"):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    yield driver
    driver.quit()
    print(f"\nscreenshots of the page: {SCREENSHOTS}")


def wait_for(driver, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def upload(driver, path: Path) -> None:
    by_id(driver, "file").send_keys(str(path))


def test_the_page_classifies_explains_and_shows_the_model_card(browser, tiny_server, tmp_path):
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(f"{tiny_server.base}/")
    wait_for(driver, lambda d: by_id(d, "token-box").is_displayed())
    assert "token" in by_id(driver, "status").text
    driver.save_screenshot(str(SCREENSHOTS / "1-needs-token.png"))

    by_id(driver, "token").send_keys("not-the-token")
    by_id(driver, "token-use").click()
    wait_for(driver, lambda d: "not this server's token" in by_id(d, "error").text)

    by_id(driver, "token").clear()
    by_id(driver, "token").send_keys(tiny_server.token)
    by_id(driver, "token-use").click()
    wait_for(driver, lambda d: by_id(d, "card").is_displayed())
    card = by_id(driver, "card-fields").text
    for words in ("cifar10-tiny", "champion", "cnn", "validation accuracy", "test accuracy",
                  "synthetic", "trained"):  # fmt: skip
        assert words in card, card
    assert not by_id(driver, "token-box").is_displayed()

    picture = tmp_path / "real.png"
    picture.write_bytes(encode_png(real_image()))
    upload(driver, picture)
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#top li")) == 3)
    top = [
        item.get_attribute("data-target")
        for item in driver.find_elements(By.CSS_SELECTOR, "#top li")
    ]
    shares = [
        float(s.text.rstrip("%")) for s in driver.find_elements(By.CSS_SELECTOR, "#top .share")
    ]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.05
    overlay = by_id(driver, "overlay")
    wait_for(driver, lambda d: overlay.get_attribute("src").startswith("data:image/png;base64,"))
    assert by_id(driver, "overlay-caption").text == f"Grad-CAM for {top[0]}"
    answer = requests.post(
        f"{tiny_server.base}/v1/models/cifar10-tiny:predict",
        json={"instances": [base64.b64encode(picture.read_bytes()).decode()]},
        headers={"Authorization": f"Bearer {tiny_server.token}"},
    ).json()
    assert answer["predictions"][0]["class_name"] == top[0]
    driver.save_screenshot(str(SCREENSHOTS / "2-top-class.png"))

    first = overlay.get_attribute("src")
    other = next(b for b in driver.find_elements(By.CSS_SELECTOR, "#classes button")
                 if b.text != top[0])  # fmt: skip
    other.click()
    wait_for(driver, lambda d: by_id(d, "overlay-caption").text == f"Grad-CAM for {other.text}")
    assert overlay.get_attribute("src") != first
    assert "active" in other.get_attribute("class")
    driver.save_screenshot(str(SCREENSHOTS / "3-clicked-class.png"))

    driver.find_elements(By.CSS_SELECTOR, "#top li")[1].click()
    wait_for(driver, lambda d: by_id(d, "overlay-caption").text == f"Grad-CAM for {top[1]}")

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not a picture")
    upload(driver, not_an_image)
    wait_for(driver, lambda d: by_id(d, "error").is_displayed())
    assert "not a recognizable image" in by_id(driver, "error").text
    assert not by_id(driver, "answer").is_displayed()
    driver.save_screenshot(str(SCREENSHOTS / "4-refused-file.png"))

    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    refusals = [
        e for e in errors if "401" in e["message"] or "403" in e["message"] or "400" in e["message"]
    ]
    assert errors == refusals, errors  # only the refusals this test asked for; no CSP violation


def test_the_page_fits_a_phone_and_is_served_with_a_strict_policy(browser, tiny_server, tmp_path):
    from selenium.webdriver.common.by import By

    answer = requests.get(f"{tiny_server.base}/")
    policy = answer.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "http" not in answer.text.replace('href="/page', "")  # nothing from elsewhere
    driver = browser
    driver.set_window_size(390, 844)
    driver.get(f"{tiny_server.base}/")
    by_id(driver, "token").send_keys(tiny_server.token)
    by_id(driver, "token-use").click()
    wait_for(driver, lambda d: by_id(d, "card").is_displayed())
    picture = tmp_path / "real.png"
    picture.write_bytes(encode_png(real_image()))
    upload(driver, picture)
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#top li")) == 3)
    page_width = driver.execute_script("return document.documentElement.scrollWidth")
    window_width = driver.execute_script("return window.innerWidth")
    assert page_width <= window_width, (page_width, window_width)  # no sideways scrolling
    driver.save_screenshot(str(SCREENSHOTS / "5-phone.png"))
