"""`weightslab ui` in a real browser: headless Chromium from the system's packages (Debian's chromium and
chromium-driver; `.ci/run` installs them), driven by selenium, against a server started on a root made by
a real short training with a config change, a model change and a fork, and a hostile hyperparameter
value and metric name.

Without a browser the tests are skipped, unless ``WEIGHTSLAB_REQUIRE_BROWSER=1`` (set by ``.ci/run``):
then they fail, so CI cannot pass without having run them. A screenshot of the page is kept under
pytest's temporary directory (``ui-screenshot.png``), as the test run's artifact."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from .support import run_python

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("WEIGHTSLAB_REQUIRE_BROWSER") == "1"

if not (CHROMIUM and CHROMEDRIVER):
    if REQUIRED:
        raise RuntimeError("WEIGHTSLAB_REQUIRE_BROWSER=1 but chromium or chromedriver is not installed: "
                           "apt-get install -y chromium chromium-driver")
    pytest.skip("no chromium/chromedriver (apt-get install -y chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver") if not REQUIRED else __import__("selenium.webdriver").webdriver
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from weightslab.ui.server import make_server  # noqa: E402

# What a page must never execute: each would set a flag the test reads back.
HOSTILE_VALUE = '<script>window.__pwned = "value"</script><img src=x onerror="window.__pwned=\'img\'">'
HOSTILE_METRIC = '"><svg onload="window.__pwned=\'metric\'">'

TRAIN = r'''
import json, sys, torch
from torch import nn
import weightslab as wl
root, hostile_value, hostile_metric = sys.argv[1], sys.argv[2], sys.argv[3]
system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
config = wl.register_hyperparams("config", {"optimizer": {"lr": 0.1}, "note": hostile_value})
torch.manual_seed(0)
x, y = torch.randn(64, 4), torch.randn(64, 1)
def build(width):
    model = wl.register_model(nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1)))
    return model, wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=config["optimizer"]["lr"]))
model, opt = build(8)
losses = {}
def train(first, last):
    for step in range(first, last + 1):
        opt.zero_grad(); loss = nn.functional.mse_loss(model(x), y); loss.backward(); opt.step()
        wl.checkpoint_on_step(step, metrics={"loss": loss.item(), hostile_metric: float(step)})
        losses[f"{system.experiment_hash}@{step}"] = loss.item()
train(1, 6)
base = system.name_experiment("baseline")
config["optimizer"]["lr"] = 0.01          # a config change: a child experiment
train(7, 10)
changed = system.experiment_hash
model, opt = build(16)                     # a model change: another child
train(11, 14)
widened = system.experiment_hash
model, opt = build(8)                      # the baseline's architecture again, to fork from it
wl.fork(f"{base}@4", name="sweep", optimizer__lr=0.05)   # a named fork from step 4
train(5, 8)
system.close()
print(json.dumps({"base": base, "changed": changed, "widened": widened, "fork": system.experiment_hash,
                  "losses": losses}))
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ui") / "root"
    proc = run_python(TRAIN, args=[str(root), HOSTILE_VALUE, HOSTILE_METRIC], timeout=300)
    return root, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # no connections opened ahead of need: each would hold one of the server's request threads
    options.add_experimental_option("prefs", {"net.network_prediction_options": 2})
    # (the background-networking flags: this machine's closed network refuses Chromium's own connections)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(trained, browser, tmp_path_factory):
    root, runs = trained
    with make_server(root) as server:
        browser.get(server.url)
        yield browser, runs, server
        browser.save_screenshot(str(tmp_path_factory.getbasetemp() / "ui-screenshot.png"))


def _pwned(driver) -> object:
    return driver.execute_script("return window.__pwned === undefined ? null : window.__pwned")


def test_the_lineage_shows_every_experiment_with_the_right_edges(page):
    driver, runs, _ = page
    nodes = {n.get_attribute("data-experiment") for n in driver.find_elements(By.CSS_SELECTOR, "#lineage g.node")}
    assert nodes == {runs["base"], runs["changed"], runs["widened"], runs["fork"]}
    edges = {(e.get_attribute("data-parent"), e.get_attribute("data-child"), e.get_attribute("data-reason"))
             for e in driver.find_elements(By.CSS_SELECTOR, "#lineage g.edge")}
    assert edges == {(runs["base"], runs["changed"], "config_change"),
                     (runs["changed"], runs["widened"], "model_change"),
                     (runs["base"], runs["fork"], "fork")}
    labels = " ".join(t.text for t in driver.find_elements(By.CSS_SELECTOR, "#lineage text.reason"))
    assert "lr" in labels and "0.01" in labels  # the changed key and its value on the config edge
    base_node = driver.find_element(By.CSS_SELECTOR, f'#lineage g.node[data-experiment="{runs["base"]}"]')
    assert runs["base"][:8] in base_node.text and "baseline" in base_node.text


def test_the_curve_has_one_point_per_recorded_step(page):
    driver, runs, _ = page
    Select(driver.find_element(By.ID, "metric")).select_by_value("loss")
    WebDriverWait(driver, 10).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '#curves path.curve[data-metric="loss"]'))
    points = driver.find_elements(By.CSS_SELECTOR, "#curves circle.point")
    refs = {p.get_attribute("data-ref"): float(p.get_attribute("data-value")) for p in points}
    assert set(refs) == set(runs["losses"]) and len(points) == len(runs["losses"])
    assert all(refs[r] == pytest.approx(v, rel=1e-6) for r, v in runs["losses"].items())
    curves = {c.get_attribute("data-experiment") for c in driver.find_elements(By.CSS_SELECTOR, "#curves path.curve")}
    assert curves == {runs["base"], runs["changed"], runs["widened"], runs["fork"]}
    best = driver.find_elements(By.CSS_SELECTOR, f'#curves circle.point.best[data-ref^="{runs["base"]}@"]')
    lowest = min((v, r) for r, v in runs["losses"].items() if r.startswith(runs["base"] + "@"))[1]
    assert [b.get_attribute("data-ref") for b in best] == [lowest]


def test_clicking_a_checkpoint_shows_its_card(page):
    driver, runs, _ = page
    Select(driver.find_element(By.ID, "metric")).select_by_value("loss")
    ref = f"{runs['changed']}@9"
    point = WebDriverWait(driver, 10).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f'#curves circle.point[data-ref="{ref}"]'))
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", point)
    card = WebDriverWait(driver, 5).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f'#card .card[data-ref="{ref}"]'))
    assert card.find_element(By.CSS_SELECTOR, ".step").text == "9"
    metrics = dict(zip((t.text for t in card.find_elements(By.CSS_SELECTOR, ".metrics dt")),
                       (d.text for d in card.find_elements(By.CSS_SELECTOR, ".metrics dd"))))
    assert float(metrics["loss"]) == pytest.approx(runs["losses"][ref], rel=1e-3)
    assert card.find_element(By.CSS_SELECTOR, ".exact").text.startswith("exact")
    commands = " ".join(c.text for c in card.find_elements(By.CSS_SELECTOR, "pre.command"))
    assert ref in commands and "export" in commands


def test_hostile_values_are_shown_as_text_and_never_run(page):
    driver, runs, server = page
    time.sleep(0.5)  # (an onerror handler runs once the broken image fails to load)
    assert _pwned(driver) is None
    options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#metric option")]
    assert HOSTILE_METRIC in options  # the metric is listed, under its real name
    # (selected by its option, not by a CSS selector built from the value: the value holds quotes)
    option = next(o for o in driver.find_elements(By.CSS_SELECTOR, "#metric option")
                  if o.get_attribute("value") == HOSTILE_METRIC)
    Select(driver.find_element(By.ID, "metric")).select_by_index(int(option.get_attribute("index")))
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#curves path.curve"))
    curves = driver.find_elements(By.CSS_SELECTOR, "#curves path.curve")
    assert {c.get_attribute("data-metric") for c in curves} == {HOSTILE_METRIC}
    time.sleep(0.5)
    assert _pwned(driver) is None
    driver.get(f"{server.url}diff?a={runs['base']}@4&b={runs['fork']}@8")
    time.sleep(0.5)
    assert _pwned(driver) is None
    driver.get(server.url)
    assert _pwned(driver) is None
    driver.get("about:blank")  # (the page's own requests are over before the test ends)
