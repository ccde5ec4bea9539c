"""Benchmark the explore page in a real browser: slider-to-new-image latency and page load time.

Starts `python main.py explore SOURCES --port 0` as a user does (a subprocess), drives headless Chromium through
the steps of tests/test_explore_browser.py (tests/browser.py), and measures in the page itself:

- slider -> new image: from a concept slider's `input` event to the regenerated image decoded on screen
  (`window.exploreTimings`), one arrow-key step at a time (each waits for its image), after 3 warm-up steps;
- a fast drag: 60 `input` events at 60 Hz; how many images were rendered (the rest coalesced) and how long
  after the last event the last image showed;
- page load: navigation start to the load event, and to the tabs and first view drawn, with the browser cache
  off (median over --loads loads).

    python bench/bench_explore.py --bundle runs/demo/NAME/viscoin                    # the world demo (32 px)
    python bench/bench_explore.py --bundle B.pt --device cuda --moves 200           # on a GPU
    python bench/bench_explore.py --bundle B.pt --retrieval R --phylo P --runs DIR --screenshots docs/img
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the page's browser helpers, shared with its tests


def start_server(sources: list[str], device: str) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable,
        str(ROOT / "main.py"),
        "explore",
        *sources,
        "--port",
        "0",
        "--device",
        device,
        "-q",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    for line in process.stdout:
        lines.append(line)
        found = re.search(r" at (http://\S+)", line)
        if found:
            return process, found.group(1).rstrip("/")
    raise SystemExit("explore did not start:\n" + "".join(lines[-20:]))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def slider_latency(driver, url: str, image: int, moves: int) -> dict:
    from browser import choose_image, move_slider, open_page, open_tab
    from selenium.webdriver.common.keys import Keys

    open_page(driver, url + "/")
    section = open_tab(driver, "Concepts")
    choose_image(driver, section, image)
    for key in (Keys.RIGHT, Keys.RIGHT, Keys.LEFT):  # warm-up
        move_slider(driver, section, key)
    driver.execute_script("window.exploreTimings.length = 0")
    wall = []
    for i in range(moves):
        start = time.perf_counter()
        move_slider(driver, section, Keys.RIGHT if (i // 10) % 2 == 0 else Keys.LEFT)
        wall.append(1000 * (time.perf_counter() - start))
    timings = driver.execute_script("return window.exploreTimings")
    page, server = [t["ms"] for t in timings], [t["server_ms"] for t in timings]
    return {"n": len(page), "p50_ms": percentile(page, 50), "p95_ms": percentile(page, 95), "max_ms": max(page),
            "mean_ms": statistics.mean(page), "server_p50_ms": percentile(server, 50),
            "server_p95_ms": percentile(server, 95), "webdriver_p50_ms": percentile(wall, 50)}  # fmt: skip


def fast_drag(driver, events: int = 60, hz: float = 60.0) -> dict:
    """`events` input events on the first slider at `hz`, as a quick drag: how many images were rendered (the
    others coalesced away) and how long after the last event its image was on screen."""
    script = """
      const [events, interval, done] = arguments;
      const section = [...document.querySelectorAll('section.concepts')].find((s) => !s.hidden);
      const slider = section.querySelector('.slider input[type=range]');
      let i = 0;
      const tick = () => {
        slider.value = (1 + 2 * (i + 1) / events).toFixed(2);
        slider.dispatchEvent(new Event('input'));
        if (++i < events) setTimeout(tick, interval); else done(slider.value);
      };
      tick();
    """
    driver.set_script_timeout(120)
    start = len(driver.execute_script("return window.exploreTimings"))
    last_value = driver.execute_async_script(script, events, 1000 / hz)
    from browser import wait_for

    wait_for(driver, "const s = [...document.querySelectorAll('section.concepts')].find((s) => !s.hidden);"
                     "return s.querySelector('.slider output').textContent === '\u00d7' + Number(arguments[0]).toFixed(2)"
                     " && window.exploreTimings.length > arguments[1]", last_value, start)  # fmt: skip
    count = -1
    while count != len(driver.execute_script("return window.exploreTimings")):  # until no image is pending
        count = len(driver.execute_script("return window.exploreTimings"))
        time.sleep(0.5)
    shown = driver.execute_script("return window.exploreTimings")[start:]
    return {"events": events, "renders": len(shown), "last_image_ms_after_its_event": shown[-1]["ms"]}


def page_loads(driver, url: str, loads: int) -> dict:
    from browser import open_page

    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
    rows = []
    for _ in range(loads):
        driver.get("about:blank")
        rows.append(open_page(driver, url + "/"))
    return {"loads": loads, "load_s": statistics.median(r["load_s"] for r in rows),
            "ready_s": statistics.median(r["ready_s"] for r in rows), "max_ready_s": max(r["ready_s"] for r in rows)}  # fmt: skip


def screenshots(driver, url: str, folder: Path, image: int, kinds: list[str]) -> list[Path]:
    """The README's pictures: the steps of the browser test on these models."""
    from browser import choose_image, move_slider, open_page, open_tab, wait_for
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    folder.mkdir(parents=True, exist_ok=True)
    driver.set_window_size(1480, 1420)  # the whole Concepts tab, relevance chart included
    driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": False})
    open_page(driver, url + "/")
    written = []

    def shot(name: str) -> None:  # once the page settled (animations, image decoding)
        time.sleep(0.5)
        written.append(folder / f"explore-{name}.png")
        driver.save_screenshot(str(written[-1]))

    section = open_tab(driver, "Concepts")
    choose_image(driver, section, image)
    for _ in range(30):
        move_slider(driver, section, Keys.RIGHT)  # the first concept to x2.5
    section.find_element(By.CSS_SELECTOR, ".slider .concept-name").click()
    wait_for(
        driver,
        "return arguments[0].querySelectorAll('.card .gallery .thumb').length > 0",
        section,
        timeout=600,
    )
    shot("concepts")
    if "retrieval" in kinds:
        section = open_tab(driver, "Retrieval")
        wait_for(driver, "return arguments[0].querySelector('.legend .legend-item')", section, timeout=120)
        canvas = section.find_element(By.CSS_SELECTOR, "canvas.projection")
        point = driver.execute_script("const c = arguments[0]; const ctx = c.getContext('2d');"
                                      "const d = ctx.getImageData(0, 0, c.width, c.height).data;"
                                      "for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 200) "
                                      "return [(i / 4) % c.width, Math.floor(i / 4 / c.width)]; return null;", canvas)  # fmt: skip
        from selenium.webdriver.common.action_chains import ActionChains

        size = canvas.size
        scale = size["width"] / driver.execute_script("return arguments[0].width", canvas)
        ActionChains(driver).move_to_element_with_offset(canvas, point[0] * scale - size["width"] / 2 + 2,
                                                         point[1] * scale - size["height"] / 2 + 2).click().perform()  # fmt: skip
        wait_for(driver, "return arguments[0].querySelector('.result')", section, timeout=60)
        shot("retrieval")
    if "phylo" in kinds:
        section = open_tab(driver, "Phylo-NN")
        section.find_elements(By.CSS_SELECTOR, "circle.node.clickable")[1].click()
        wait_for(
            driver, "return arguments[0].querySelectorAll('.samples img').length > 0", section, timeout=60
        )
        shot("phylo")
    if "runs" in kinds:
        section = open_tab(driver, "Runs")
        wait_for(driver, "return arguments[0].querySelectorAll('svg.chart').length > 0", section, timeout=60)
        shot("runs")
    return written


def machine(device: str) -> str:
    import platform

    load = os.getloadavg()
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")] if info.exists() else []  # fmt: skip
    cpu = names[0] if names else platform.processor()
    return f"{os.cpu_count()} CPU cores ({cpu}), device {device}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle", required=True, help="VisCoIN bundle or run (e.g. the demo's viscoin run)."
    )
    parser.add_argument("--retrieval", help="Also open this retrieval run (screenshots).")
    parser.add_argument("--phylo", help="Also open this Phylo-NN run (screenshots).")
    parser.add_argument("--cvae", help="Also open this CVAE run.")
    parser.add_argument("--runs", help="Also open this folder of runs (screenshots).")
    parser.add_argument("--device", default="cpu", help="The server's --device (default cpu).")
    parser.add_argument("--image", type=int, default=5, help="Index of the test image whose sliders move.")
    parser.add_argument("--moves", type=int, default=100, help="Slider steps timed.")
    parser.add_argument("--loads", type=int, default=5, help="Page loads timed.")
    parser.add_argument("--screenshots", type=Path, help="Write the README's screenshots into this folder.")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args(argv)

    from browser import ensure_browser, start_browser, stop_browser

    reason = ensure_browser()
    if reason:
        raise SystemExit(f"no browser: {reason}")
    extra = {"retrieval": args.retrieval, "phylo": args.phylo, "cvae": args.cvae, "runs": args.runs}
    sources = [args.bundle, *[path for path in extra.values() if path]]
    process, url = start_server(sources, args.device)
    driver = start_browser()
    try:
        result = {"machine": machine(args.device), "bundle": args.bundle}
        result["page"] = page_loads(driver, url, args.loads)
        result["slider"] = slider_latency(driver, url, args.image, args.moves)
        result["drag"] = fast_drag(driver)
        if args.screenshots:
            kinds = [kind for kind, path in extra.items() if path]
            result["screenshots"] = [
                str(p) for p in screenshots(driver, url, args.screenshots, args.image, kinds)
            ]
    finally:
        stop_browser(driver)
        process.terminate()
        process.wait(30)
    s, p, g = result["slider"], result["page"], result["drag"]
    print(f"machine: {result['machine']}")
    print(f"slider -> new image ({s['n']} steps): p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, "
          f"max {s['max_ms']:.1f} ms (goal p95 < 150 ms on 2 CPU cores at 32 px); of which the server's request "
          f"(decode, classify, PNG): p50 {s['server_p50_ms']:.1f} ms, p95 {s['server_p95_ms']:.1f} ms")  # fmt: skip
    print(f"fast drag: {g['events']} input events at 60 Hz -> {g['renders']} images rendered (the rest coalesced); "
          f"the last one on screen {g['last_image_ms_after_its_event']:.0f} ms after its event")  # fmt: skip
    print(f"page load (cache off, median of {p['loads']}): load event {p['load_s']:.2f} s, tabs and first view "
          f"drawn {p['ready_s']:.2f} s (goal < 2 s)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
