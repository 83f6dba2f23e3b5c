"""Build `secateur report` for models and check it in a real browser: headless Chromium (Debian's
`chromium` package) loads the page, its DOM must hold every section and every figure must have
loaded (naturalWidth > 0), and a full-page screenshot is written (docs/report.png for the README).

    python benchmarks/report_render.py MODEL [MODEL ...] [--out bench-out/report] [--screenshot docs/report.png] [secateur report flags]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("id=\"summary\"", "id=\"removed\"", "id=\"samples\"")
# appended to a copy of the page: after load, it writes what the browser saw into the DOM
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-images', JSON.stringify(imgs.map(i => [i.getAttribute('src'), i.naturalWidth])));
});</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise SystemExit("chromium not found: apt-get install chromium")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--out", default=str(ROOT / "bench-out" / "report"))
    parser.add_argument("--screenshot", default=str(ROOT / "docs" / "report.png"))
    args, extra = parser.parse_known_args()  # the rest: `secateur report` flags (--bench, --samples, ...)
    clock = time.perf_counter()
    subprocess.run([sys.executable, "-m", "secateur.cli", "report", *args.models, "--out", args.out, "--overwrite",
                    *extra], check=True)  # fmt: skip
    seconds = time.perf_counter() - clock
    page = Path(args.out) / "index.html"
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run([chromium(), *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    missing = [s for s in SECTIONS if s not in dom]
    images = json.loads(dom.split('data-images="')[1].split('"')[0].replace("&quot;", '"')) if "data-images" in dom else []
    broken = [src for src, width in images if not width]
    subprocess.run([chromium(), *flags, "--window-size=1200,2600", f"--screenshot={args.screenshot}", page.as_uri()],
                   check=True, capture_output=True)  # fmt: skip
    probe.unlink()
    print(f"report for {len(args.models)} models in {seconds:.1f} s (the command, process start included); "
          f"rendered by {subprocess.run([chromium(), '--version'], capture_output=True, text=True).stdout.strip()}: "
          f"{len(images)} figures, {len(broken)} broken, sections missing: {missing or 'none'}; "
          f"screenshot {args.screenshot}")
    return 1 if missing or broken or not images else 0


if __name__ == "__main__":
    sys.exit(main())
