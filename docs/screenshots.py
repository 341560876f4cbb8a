"""`make screenshots`: the default sweep in a fresh folder, then what a user sees, as headless Chromium renders it:
the runs table the printed UI link opens (docs/mlflow-ui.png) and the top of the report (docs/report.png); then the
digits CNN sweep (sweeps/digits_cnn.yaml) the same way: its printed answer, which the README quotes
(docs/digits_cnn_answer.txt, with the date and the CPU it ran on), and its report (docs/digits_cnn_report.png).
`python docs/screenshots.py digits` does the digits part alone."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEPLAB = [sys.executable, "-m", "sweeplab"]


def chromium(url: str, png: Path, height: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("screenshots: needs Debian's chromium (apt-get install chromium)")
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--window-size=1600,{height}",
            "--virtual-time-budget=20000",
            "--hide-scrollbars",
            f"--screenshot={png}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    print(f"wrote {png.relative_to(ROOT)}")


def main() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SWEEPLAB_STORAGE")}
    with tempfile.TemporaryDirectory(prefix="sweeplab-screens-") as tmp:
        subprocess.run(
            [*SWEEPLAB, "sweep", str(ROOT / "sweeps/optimizer_hidden_noise.yaml"), "--quiet"],
            cwd=tmp,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        chromium(Path(tmp, "reports/optimizer_hidden_noise/report.html").as_uri(), ROOT / "docs/report.png", 1500)
        ui = subprocess.Popen(
            [*SWEEPLAB, "ui", "optimizer_hidden_noise", "--port", "5099"],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            link = ui.stdout.readline().split()[2]
            chromium(link, ROOT / "docs/mlflow-ui.png", 1000)
        finally:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(timeout=30)


def digits() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SWEEPLAB_STORAGE")}
    with tempfile.TemporaryDirectory(prefix="sweeplab-digits-") as tmp:
        out = subprocess.run(
            [*SWEEPLAB, "sweep", str(ROOT / "sweeps/digits_cnn.yaml"), "--quiet"],
            cwd=tmp,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        answer = [line for line in out.splitlines() if line.startswith(("report for", "train_fraction="))]
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "unknown CPU",
        )
        stamp = f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {cpu}"
        (ROOT / "docs/digits_cnn_answer.txt").write_text(
            f"# sweeps/digits_cnn.yaml ({stamp})\n" + "\n".join(answer) + "\n"
        )
        print("wrote docs/digits_cnn_answer.txt")
        chromium(Path(tmp, "reports/digits_cnn/report.html").as_uri(), ROOT / "docs/digits_cnn_report.png", 1500)


if __name__ == "__main__":
    if sys.argv[1:] != ["digits"]:
        main()
    digits()
