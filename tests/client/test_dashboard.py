"""The web dashboard (``/ui``) in a real headless Chromium (Debian's package, driven by its
chromedriver through selenium) against a running ``asft serve`` with a really trained tiny
job: sign in, the job page's charts and safety tables against the API's own numbers, chat,
cancel, another team's job, compare, files and models. Screenshots of every page go to
``$ASFT_TEST_OUTPUT/dashboard`` (default ``var/test-output``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from asft_core.zoo import ZooPaths
from tests.client.embedded import Service, allow_unapproved_chat, asft, create_job, first_rows
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = Path(os.environ.get("ASFT_TEST_OUTPUT", REPO_ROOT / "var" / "test-output"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium at a laptop's size; CI installs it (``make setup-tools``)."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is missing: `make setup-tools` installs Debian's packages")
        pytest.skip("Chromium is not installed (make setup-tools)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,2000")
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def api(service: Service, path: str, key: str | None = None) -> Any:
    """GET an API path with the team key; the JSON."""
    response = httpx.get(
        f"{service.url}{path}", headers={"Authorization": f"Bearer {key or service.team_key}"}
    )
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(condition: Callable[[], Any], timeout_s: float = 60, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class Dashboard:
    """The dashboard in the browser, as one signed-in user."""

    def __init__(self, driver: Any, service: Service) -> None:
        self.driver = driver
        self.service = service

    def sign_in(self, key: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.get(f"{self.service.url}/ui#/jobs")
        self.driver.execute_script("sessionStorage.clear()")
        self.driver.refresh()
        field = wait_for(lambda: self.driver.find_elements(By.ID, "api-key"), what="sign-in")[0]
        field.send_keys(key)
        self.driver.find_element(By.CSS_SELECTOR, "form.signin button[type=submit]").click()

    def open(self, route: str, view: str) -> None:
        """Go to ``#/route`` and wait until ``view`` is drawn for it (a hash change is no
        page load: the view before stays up until the new one replaces it)."""
        self.driver.get(f"{self.service.url}/ui#/{route}")
        self.wait_ready(view, f"#/{route}")

    def wait_ready(self, view: str, route: str | None = None, timeout_s: float = 60) -> None:
        def drawn() -> bool:
            ready, shown = self.js(
                "const m = document.getElementById('main');"
                "return [m.dataset.ready, m.dataset.route]"
            )
            return bool(ready == view and (route is None or shown == route))

        wait_for(drawn, timeout_s, f"the {view} view of {route}")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def screenshot(self, name: str) -> None:
        folder = SCREENSHOTS / "dashboard"
        folder.mkdir(parents=True, exist_ok=True)
        # The whole page, not just the window: resize to its height first.
        height = self.js("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1280, max(800, min(int(height) + 40, 6000)))
        self.driver.save_screenshot(str(folder / f"{name}.png"))
        self.driver.set_window_size(1280, 2000)


@pytest.fixture(scope="module")
def finished(
    service: Service, registered: str, zoo: ZooPaths, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A tiny asft job trained to the end, with a validation file and checkpoints."""
    folder = tmp_path_factory.mktemp("dashboard")
    training = first_rows(zoo.task_file("sentiment", "train"), folder / "train.jsonl", 40)
    held_out = first_rows(zoo.task_file("sentiment", "eval"), folder / "held_out.jsonl", 16)
    job_id = create_job(
        service,
        registered,
        training,
        "--validation-file",
        str(held_out),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--learning-rate",
        "1e-3",
        "--matcher",
        "exact_label",
        "--suffix",
        "ui",
    )
    # create_job asks for plain LoRA; the dashboard shows the same for every method.
    watched = asft(service, "jobs", "watch", job_id, "--poll-s", "0.5")
    job = api(service, f"/v1/fine_tuning/jobs/{job_id}")
    assert job["status"] in ("succeeded", "failed") and job["fine_tuned_model"], (
        job,
        watched.stderr,
    )
    return job  # type: ignore[no-any-return]


JOB_ROWS = "return [...document.querySelectorAll('#jobs tr[data-job]')].map(r => r.dataset.job)"


@pytest.fixture(scope="module")
def dashboard(browser: Any, service: Service) -> Dashboard:
    board = Dashboard(browser, service)
    board.sign_in(service.team_key)
    board.wait_ready("jobs")
    return board


def test_the_page_is_locked_down(service: Service) -> None:
    page = httpx.get(f"{service.url}/ui")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "'unsafe-inline'" not in policy and "connect-src 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{service.url}/ui/static/app.js").status_code == 200
    assert httpx.get(f"{service.url}/ui/static/../../api/main.py").status_code == 404
    assert httpx.get(f"{service.url}/ui/static/index.html").status_code == 404


def test_sign_in_refuses_a_wrong_key_and_keeps_the_key_out_of_urls(
    browser: Any, service: Service
) -> None:
    log = service.data_dir.parent / "serve.log"
    printed = log.read_text(errors="replace").count(service.team_key)  # once, at first start
    board = Dashboard(browser, service)
    board.sign_in("sk-not-a-key")
    refused = wait_for(
        lambda: board.js("return document.querySelector('form.signin [role=alert]').textContent"),
        what="the refusal",
    )
    assert "refused that key" in refused
    board.sign_in(service.team_key)
    board.wait_ready("jobs")
    assert service.team_key not in browser.current_url
    assert board.js("return sessionStorage.getItem('asft-api-key')") == service.team_key
    # Every request the page made went to the service itself: no third party, no CDN.
    origins = board.js(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
    )
    assert origins and set(origins) == {service.url}
    # The service logged the page's requests, and never the key they carried.
    assert log.read_text(errors="replace").count(service.team_key) == printed


def test_a_finished_job_page_draws_the_apis_numbers(
    dashboard: Dashboard, service: Service, finished: dict[str, Any]
) -> None:
    from selenium.webdriver.common.by import By

    job_id = finished["id"]
    dashboard.open(f"jobs/{job_id}", "job")
    base = f"/v1/fine_tuning/jobs/{job_id}"
    curves = api(service, f"{base}/metrics?resolution=600")
    assert curves["data"] and curves["validation"]
    drawn = dashboard.js(
        "return document.querySelector('#loss-chart polyline[data-series=train_loss]')"
        ".getAttribute('data-points')"
    )
    assert int(drawn) == len(curves["data"])
    dots = dashboard.driver.find_elements(By.CSS_SELECTOR, "#loss-chart g[data-series] circle")
    assert len(dots) == len(curves["validation"])
    progress = dashboard.driver.find_element(By.ID, "progress-text").text
    assert progress.startswith(f"Step {curves['last_step']} of {curves['total_steps']}")

    report = api(service, f"{base}/report")["report"]["evaluation"]
    shown = dashboard.js(
        "return [...document.querySelectorAll('#safety-table tbody tr')].map(row => "
        "[row.dataset.category, [...row.querySelectorAll('td')].map(td => "
        "[Number(td.dataset.value), Number(td.dataset.low), Number(td.dataset.high), "
        "td.textContent])])"
    )
    expected_rows = ["overall", *sorted(report["fine_tuned"]["safety"]["per_category"])]
    assert [row[0] for row in shown] == expected_rows
    for category, cells in shown:
        for side, (value, low, high, text) in zip(("reference", "fine_tuned"), cells, strict=True):
            safety = report[side]["safety"]
            cell = safety["overall"] if category == "overall" else safety["per_category"][category]
            assert (value, low, high) == (cell["value"], cell["low"], cell["high"])
            assert text.startswith(f"{100 * cell['value']:.1f}% [{100 * cell['low']:.1f}, ")
    accuracy = dashboard.js(
        "return [...document.querySelectorAll('#utility-table tr[data-measure=accuracy] td')]"
        ".map(td => Number(td.dataset.value))"
    )
    assert accuracy == [
        report["reference"]["task"]["accuracy"]["value"],
        report["fine_tuned"]["task"]["accuracy"]["value"],
    ]
    gate = dashboard.driver.find_element(By.ID, "gate").text
    assert ("approved" if finished["safety"]["approved"] else "refused") in gate
    model = api(service, f"/v1/models/{finished['fine_tuned_model']}")
    assert dashboard.driver.find_element(By.ID, "adapter-sha").text == model["sha256"]
    checkpoints = api(service, f"{base}/checkpoints?limit=100")["data"]
    rows = dashboard.driver.find_elements(By.CSS_SELECTOR, "#checkpoints tbody tr")
    assert len(rows) == len(checkpoints)
    dashboard.screenshot("job")


def test_chat_with_the_finished_model(
    dashboard: Dashboard, service: Service, finished: dict[str, Any]
) -> None:
    from selenium.webdriver.common.by import By

    allow_unapproved_chat(service)  # whatever the tiny job's gate said
    dashboard.open(f"jobs/{finished['id']}", "job")
    question = "Classify the sentiment: I loved every minute of it."
    dashboard.driver.find_element(By.ID, "chat-input").send_keys(question)
    dashboard.driver.find_element(By.CSS_SELECTOR, ".chat-form button[type=submit]").click()
    answer = httpx.post(
        f"{service.url}/v1/chat/completions",
        json={
            "model": finished["fine_tuned_model"],
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": 128,
        },
        headers={"Authorization": f"Bearer {service.team_key}"},
        timeout=120,
    ).json()["choices"][0]["message"]["content"]
    shown = wait_for(
        lambda: dashboard.js(
            "const reply = document.querySelector('.chat-log p.assistant, .chat-log p.error');"
            "return reply && !document.querySelector('.chat-form button').disabled"
            " ? reply.textContent : null"
        ),
        120,
        "the answer",
    )
    assert shown == answer
    dashboard.screenshot("job-chat")


def test_cancel_a_running_job(
    dashboard: Dashboard, service: Service, registered: str, zoo: ZooPaths, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    training = first_rows(zoo.task_file("sentiment", "train"), tmp_path / "long.jsonl", 64)
    job_id = create_job(service, registered, training, "--epochs", "50", "--batch-size", "1")
    wait_for(
        lambda: api(service, f"/v1/fine_tuning/jobs/{job_id}/metrics")["steps_recorded"] > 0,
        180,
        "the job to train",
    )
    dashboard.open(f"jobs/{job_id}", "job")
    button = dashboard.driver.find_element(By.ID, "cancel")
    dashboard.screenshot("job-running")
    button.click()
    dashboard.driver.switch_to.alert.accept()
    wait_for(
        lambda: api(service, f"/v1/fine_tuning/jobs/{job_id}")["status"] == "cancelled",
        120,
        "the cancellation",
    )
    # The page follows by itself (conditional polling), without a reload.
    wait_for(
        lambda: dashboard.driver.find_elements(By.CSS_SELECTOR, "#main .badge.cancelled"),
        30,
        "the cancelled badge",
    )
    assert not dashboard.driver.find_elements(By.ID, "cancel")


def test_another_teams_job_is_not_found(
    browser: Any, service: Service, finished: dict[str, Any]
) -> None:
    admin = {"Authorization": f"Bearer {service.admin_key}"}
    team = httpx.post(f"{service.url}/v1/admin/teams", json={"name": "ui-beta"}, headers=admin)
    assert team.status_code == 200, team.text
    key = httpx.post(
        f"{service.url}/v1/admin/teams/{team.json()['id']}/keys", json={}, headers=admin
    ).json()["key"]
    board = Dashboard(browser, service)
    board.sign_in(key)
    board.wait_ready("jobs")
    board.open(f"jobs/{finished['id']}", "not-found")
    assert "not found" in board.js("return document.querySelector('h1').textContent")
    board.screenshot("job-not-found")
    board.sign_in(service.team_key)  # back to the team the other tests use
    board.wait_ready("jobs")


def test_jobs_compare_files_and_models(
    dashboard: Dashboard, service: Service, finished: dict[str, Any], registered: str
) -> None:
    from selenium.webdriver.common.by import By

    dashboard.open("jobs", "jobs")
    listed = api(service, "/v1/fine_tuning/jobs?limit=50")["data"]
    # Read in one call: the list redraws itself while jobs change.
    assert dashboard.js(JOB_ROWS) == [job["id"] for job in listed]
    dashboard.screenshot("jobs")
    # A filter is a query of the API: only the finished job's status.
    dashboard.open(f"jobs?status={finished['status']}", "jobs")
    shown = set(dashboard.js(JOB_ROWS))
    assert finished["id"] in shown
    assert all(job["status"] == finished["status"] for job in listed if job["id"] in shown)

    others = [job["id"] for job in listed if job["id"] != finished["id"]]
    dashboard.open(f"compare?ids={finished['id']},{others[0]}", "compare")
    evaluated = sum(
        1
        for job_id in (finished["id"], others[0])
        if httpx.get(
            f"{service.url}/v1/fine_tuning/jobs/{job_id}/report",
            headers={"Authorization": f"Bearer {service.team_key}"},
        ).status_code
        == 200
    )
    plane = dashboard.driver.find_elements(By.ID, "hs-fa-plane")
    assert int(plane[0].get_attribute("data-points")) == evaluated
    dashboard.screenshot("compare")

    dashboard.open("files", "files")
    files = api(service, "/v1/files?limit=100")["data"]
    shown_files = dashboard.driver.find_elements(By.CSS_SELECTOR, "#files tbody tr")
    assert len(shown_files) == len(files)
    dashboard.screenshot("files")

    dashboard.open("models", "models")
    pair = dashboard.driver.find_element(By.CSS_SELECTOR, f"#pairs tr[data-model='{registered}']")
    regime = api(service, f"/v1/models/{registered}")["alignment"]
    assert regime is None or regime["regime"] in pair.text
    dashboard.screenshot("models")


def test_a_phone_sized_screen_keeps_every_control_reachable(
    dashboard: Dashboard, finished: dict[str, Any]
) -> None:
    dashboard.driver.set_window_size(390, 844)
    try:
        dashboard.open(f"jobs/{finished['id']}", "job")
        # Nothing wider than the screen but the tables, which scroll inside their box.
        overflow = dashboard.js("return document.documentElement.scrollWidth")
        assert overflow <= 390
        folder = SCREENSHOTS / "dashboard"
        folder.mkdir(parents=True, exist_ok=True)
        dashboard.driver.save_screenshot(str(folder / "job-phone.png"))
    finally:
        dashboard.driver.set_window_size(1280, 2000)


# WCAG 2 contrast of every element with text of its own against the background it is drawn
# on (the nearest ancestor with an opaque one): [text, ratio, large] below the AA bar.
LOW_CONTRAST = """
const channel = c => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
const luminance = rgb =>
  0.2126 * channel(rgb[0]) + 0.7152 * channel(rgb[1]) + 0.0722 * channel(rgb[2]);
const parse = text => text.match(/[\\d.]+/g).map(Number);
const background = element => {
  for (let e = element; e; e = e.parentElement) {
    const color = parse(getComputedStyle(e).backgroundColor);
    if (color.length < 4 || color[3] === 1) return color;
  }
  return [255, 255, 255];
};
const failures = [];
for (const element of document.querySelectorAll('main *, header *')) {
  const own = [...element.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
  const style = getComputedStyle(element);
  if (!own || style.visibility === 'hidden' || element.closest('.visually-hidden, svg')) continue;
  if (!element.getClientRects().length) continue;
  const [l1, l2] = [luminance(parse(style.color)), luminance(background(element))];
  const ratio = (Math.max(l1, l2) + 0.05) / (Math.min(l1, l2) + 0.05);
  const size = parseFloat(style.fontSize);
  const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
  if (ratio < (large ? 3 : 4.5)) {
    failures.push([element.textContent.trim().slice(0, 40), ratio, large]);
  }
}
return failures;
"""

# Controls without a name a screen reader could announce.
UNNAMED_CONTROLS = """
const controls = 'main input, main select, main textarea, main button, nav a, nav button';
return [...document.querySelectorAll(controls)]
  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
               && !e.textContent.trim())
  .map(e => e.outerHTML.slice(0, 80));
"""


def test_pages_pass_contrast_and_name_every_control(
    dashboard: Dashboard, finished: dict[str, Any]
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for route, view in (("jobs", "jobs"), (f"jobs/{finished['id']}", "job"), ("files", "files")):
        dashboard.open(route, view)
        assert dashboard.js(LOW_CONTRAST) == [], route
        assert dashboard.js(UNNAMED_CONTROLS) == [], route
    # The keyboard alone reaches the navigation and the filters, with a visible focus ring.
    dashboard.open("jobs", "jobs")
    dashboard.js("document.querySelector('a.skip').focus()")  # the page's first stop
    reached = []
    for _ in range(12):
        ActionChains(dashboard.driver).send_keys(Keys.TAB).perform()
        reached.append(
            dashboard.js(
                "const e = document.activeElement; const s = getComputedStyle(e);"
                "return [e.getAttribute('name') || e.textContent.trim(), s.outlineStyle];"
            )
        )
    names = [name for name, _ in reached]
    assert {"Jobs", "Compare", "Files", "Models", "status", "method"} <= set(names), names
    assert all(outline != "none" for _, outline in reached), reached
