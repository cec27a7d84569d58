"""`nas compare`: a blind side-by-side survey page for two runs, and the tally of its votes.

The seed's protocol (DeciDiffusion vs SD 1.5): the same prompts and seeds through both models
(10 prompts x 3 images by default, 50 steps for A against 30 for B), shown in pairs whose left/right
order is random, and for every pair a vote on prompt adherence and on aesthetics. The page is static
(open OUT/index.html from disk, no server, nothing loaded from outside); as a static page cannot
write files, it builds the votes JSON itself, shows it in a text box and offers it as a download.
`nas compare --tally votes*.json` adds up any number of voters' files.

OUT/ index.html  images/{a,b}_PPP_J.png  key.json (which side is which model)  compare.json (settings)
"""

from __future__ import annotations

import gc
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from nas.core.errors import NasError
from nas.core.runfolder import portable, write_json, write_text

VOTES_FORMAT = "nas-ab-votes/1"
CRITERIA = {  # key -> question shown on the page
    "adherence": "Which image follows the prompt better?",
    "aesthetics": "Which image looks better?",
}
CHOICES = ("left", "tie", "right")


def _render_run(run, jobs, settings, out: Path, tag: str, weights: str, device: str, progress: bool) -> dict:
    """Generate `jobs` with one run, save images/<tag>_PPP_J.png; the run's description."""
    from PIL import Image

    from nas.sample.components import load_run
    from nas.sample.generate import build_pipeline, generate, to_uint8
    from nas.sample.timing import StageClock

    components = load_run(run, weights=weights, device=device)
    pipe = build_pipeline(
        components, settings.scheduler, settings.spacing, settings.runtime, settings.precision
    )
    clock = StageClock()  # images/s and the text encoder / U-Net / VAE split, in this process
    pixels = to_uint8(
        generate(
            components, pipe, [(p, s) for p, s, _ in jobs], settings, progress, f"model {tag.upper()}", clock
        )
    )
    for (_, _, name), image in zip(jobs, pixels):
        Image.fromarray(image).save(out / "images" / f"{tag}_{name}.png")
    info = {"run": portable(run), "weights": components.weights, "model_sha256": components.model_sha256,
            "steps": settings.steps, "scheduler": settings.scheduler, "guidance": settings.guidance,
            "runtime": settings.runtime, "precision": settings.precision, "cost": clock.report()}  # fmt: skip
    del components, pipe
    gc.collect()  # one model in memory at a time
    return info


def build_compare(
    run_a,
    run_b,
    prompts: list[str],
    out: str | Path,
    settings_a,
    settings_b,
    n: int = 3,
    seed: int = 0,
    page_seed: int = 0,
    weights: str = "auto",
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Images of both runs for `prompts` x `n` seeds, and the survey page; returns compare.json's data."""
    from nas.sample.generate import check_out_folder

    settings_a.check()
    settings_b.check()
    if n < 1:
        raise NasError(f"--n must be >= 1, got {n}")
    if not prompts:
        raise NasError("no prompts to compare")
    out = Path(out)
    check_out_folder(out)
    (out / "images").mkdir(parents=True)
    jobs = [(prompt, seed + j, f"{p:03d}_{j}") for p, prompt in enumerate(prompts) for j in range(n)]
    models = {
        "A": _render_run(run_a, jobs, settings_a, out, "a", weights, device, progress),
        "B": _render_run(run_b, jobs, settings_b, out, "b", weights, device, progress),
    }
    # timings vary run to run: kept out of the page (and its id), reported in compare.json
    cost = {tag: models[tag].pop("cost") for tag in models}
    order = random.Random(page_seed)
    pairs = []
    for k, (prompt, image_seed, name) in enumerate(jobs):
        left = order.choice("AB")
        right = "B" if left == "A" else "A"
        pairs.append({"pair": k, "prompt": prompt, "seed": image_seed, "left_model": left,
                      "left": f"images/{left.lower()}_{name}.png", "right": f"images/{right.lower()}_{name}.png"})  # fmt: skip
    page_id = hashlib.sha256(json.dumps([models, pairs], sort_keys=True).encode()).hexdigest()[:16]
    data = {"format": VOTES_FORMAT, "page": page_id, "models": models, "criteria": CRITERIA, "pairs": pairs}
    write_text(out / "index.html", render_page(data))
    write_json(out / "key.json", {p["pair"]: p["left_model"] for p in pairs})
    summary = {"page": page_id, "models": models, "prompts": prompts, "images_per_prompt": n, "seed": seed,
               "page_seed": page_seed, "pairs": len(pairs), "cost": cost}  # fmt: skip
    write_json(out / "compare.json", summary)
    return summary


def render_page(data: dict) -> str:
    """The self-contained survey page; `data` is embedded as JSON (no server, no external files)."""
    blob = json.dumps(data, ensure_ascii=True).replace("</", "<\\/")  # cannot close the script tag
    return PAGE.replace("__DATA__", blob)


def tally(paths: list[str | Path]) -> dict:
    """Add up votes files of one page: per criterion, wins of A and B, ties, and a two-sided sign test."""
    from scipy.stats import binomtest

    if not paths:
        raise NasError("--tally: no votes files given")
    page, models, voters = None, None, []
    counts = {c: {"A": 0, "B": 0, "tie": 0, "unanswered": 0} for c in CRITERIA}
    for path in map(Path, paths):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NasError(f"{path}: not a votes JSON file ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != VOTES_FORMAT:
            raise NasError(f"{path}: format is not {VOTES_FORMAT!r} (save the file the survey page offers)")
        if page is not None and doc.get("page") != page:
            raise NasError(f"{path}: votes of page {doc.get('page')}, the others are of page {page}")
        page, models = doc.get("page"), doc.get("models")
        voters.append(doc.get("voter") or path.name)
        for vote in doc.get("votes", []):
            for criterion in CRITERIA:
                choice = vote.get(criterion)
                if choice not in ("A", "B", "tie"):
                    choice = "unanswered"
                counts[criterion][choice] += 1
    result: dict[str, Any] = {"page": page, "models": models, "voters": voters, "criteria": {}}
    for criterion, c in counts.items():
        decided = c["A"] + c["B"]
        p_value = binomtest(c["A"], decided, 0.5).pvalue if decided else None
        share = c["B"] / (decided + c["tie"]) if decided + c["tie"] else None
        result["criteria"][criterion] = {**c, "b_preferred_share": share, "sign_test_p": p_value}
    return result


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Side-by-side survey</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 60em; color: #222; }
.pair { border: 1px solid #ccc; border-radius: 6px; padding: 0.8em; margin: 1em 0; }
.pair.done { border-color: #3a3; }
.prompt { font-weight: 600; margin-bottom: 0.5em; }
.images { display: flex; gap: 1em; justify-content: center; }
.images figure { margin: 0; text-align: center; }
.images img { width: 256px; height: 256px; image-rendering: pixelated; border: 1px solid #999; }
fieldset { border: none; margin: 0.3em 0; padding: 0; }
legend { float: left; width: 20em; }
label { margin-right: 1.2em; }
textarea { width: 100%; height: 12em; font-family: monospace; }
#progress { font-weight: 600; }
</style>
</head>
<body>
<h1>Which image is better?</h1>
<p>Each row shows two images made for the same prompt. Left and right are in random order.
For every pair answer both questions, then press <em>Download votes</em> and send the file.</p>
<p><label>Your name (optional) <input id="voter" type="text" autocomplete="off"></label></p>
<div id="pairs"></div>
<p id="progress"></p>
<p><button id="download" type="button">Download votes</button> <a id="link" hidden>votes.json</a></p>
<textarea id="votes" readonly aria-label="votes JSON"></textarea>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const CHOICES = ["left", "tie", "right"];
const answers = {};  // pair -> {criterion: "left" | "tie" | "right"}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function render() {
  const root = document.getElementById("pairs");
  for (const pair of DATA.pairs) {
    const box = el("section", {class: "pair", id: "pair-" + pair.pair});
    box.appendChild(el("div", {class: "prompt"}, (pair.pair + 1) + ". " + pair.prompt));
    const images = el("div", {class: "images"});
    for (const side of ["left", "right"]) {
      const fig = el("figure");
      fig.appendChild(el("img", {src: pair[side], alt: side + " image"}));
      fig.appendChild(el("figcaption", {}, side));
      images.appendChild(fig);
    }
    box.appendChild(images);
    for (const [criterion, question] of Object.entries(DATA.criteria)) {
      const set = el("fieldset");
      set.appendChild(el("legend", {}, question));
      for (const choice of CHOICES) {
        const label = el("label");
        const input = el("input", {type: "radio", name: criterion + "-" + pair.pair, value: choice,
                                   id: criterion + "-" + pair.pair + "-" + choice});
        input.addEventListener("change", () => {
          (answers[pair.pair] = answers[pair.pair] || {})[criterion] = choice;
          update();
        });
        label.appendChild(input);
        label.appendChild(document.createTextNode(" " + choice));
        set.appendChild(label);
      }
      box.appendChild(set);
    }
    root.appendChild(box);
  }
}

function model(pair, choice) {
  if (choice === undefined) return null;
  if (choice === "tie") return "tie";
  const other = pair.left_model === "A" ? "B" : "A";
  return choice === "left" ? pair.left_model : other;
}

function votes() {
  const criteria = Object.keys(DATA.criteria);
  const rows = DATA.pairs.map((pair) => {
    const given = answers[pair.pair] || {};
    const row = {pair: pair.pair, prompt: pair.prompt, seed: pair.seed, left_model: pair.left_model};
    for (const c of criteria) { row[c + "_side"] = given[c] || null; row[c] = model(pair, given[c]); }
    return row;
  });
  const answered = rows.filter((r) => criteria.every((c) => r[c] !== null)).length;
  return {format: DATA.format, page: DATA.page, voter: document.getElementById("voter").value.trim(),
          created: new Date().toISOString(), models: DATA.models, complete: answered === rows.length,
          answered: answered, votes: rows};
}

function update() {
  const doc = votes();
  document.getElementById("votes").value = JSON.stringify(doc, null, 2);
  document.getElementById("progress").textContent = doc.answered + " of " + doc.votes.length + " pairs answered";
  for (const row of doc.votes) {
    const done = Object.keys(DATA.criteria).every((c) => row[c] !== null);
    document.getElementById("pair-" + row.pair).classList.toggle("done", done);
  }
  return doc;
}

function download() {
  const doc = update();
  const blob = new Blob([JSON.stringify(doc, null, 2) + "\\n"], {type: "application/json"});
  const link = document.getElementById("link");
  const name = "votes-" + DATA.page + (doc.voter ? "-" + doc.voter.replace(/[^A-Za-z0-9_-]/g, "_") : "") + ".json";
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.textContent = name;
  link.hidden = false;
  link.click();
}

render();
update();
document.getElementById("voter").addEventListener("input", update);
document.getElementById("download").addEventListener("click", download);
</script>
</body>
</html>
"""
