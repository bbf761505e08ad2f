"""The static feature browser (saefast.browse.site): write_site's input checks and files, then the pages in a real
Chromium (playwright, the system's chromium, no browser download) opened from file:// — the latent table, its
sorting and filters, the latent pages with their contexts and neighbour links, and the unknown-latent message.

Screenshots of both page types go to $SAEFAST_SCREENSHOTS when set, else to the test's tmp_path."""

from __future__ import annotations

import copy
import os
import random
import re
import shutil
from pathlib import Path

import pytest

from saefast.browse.site import COLUMNS, write_site

MEMBERS, LATENTS, TOKENS = 2, 12, 9
WORDS = ["the", " cat", " sat", " on", "\n", " mat", ".", " a", " dog", "  ", " ran", ","]


def _context(rng: random.Random, top: bool) -> dict:
    """A random CONTEXT of TOKENS tokens; a top example's focus is its argmax, a quantile example's is random."""
    activations = [round(rng.random() * 5, 4) if rng.random() < 0.7 else 0.0 for _ in range(TOKENS)]
    focus = max(range(TOKENS), key=activations.__getitem__) if top else rng.randrange(TOKENS)
    tokens = [rng.choice(WORDS) for _ in range(TOKENS)]
    return {"tokens": tokens, "activations": activations, "focus": focus, "value": activations[focus]}


def _synthetic() -> tuple[dict, dict]:
    """A small INDEX and its LATENTs: 2 members x 12 latents, contexts, logits, neighbours across members,
    a shared matrix and classes (the contract of saefast/browse/site.py)."""
    rng = random.Random(0)
    latents, rows = {}, []
    for j in range(MEMBERS):
        for m in range(LATENTS):
            top = sorted((_context(rng, True) for _ in range(4)), key=lambda c: -c["value"])
            frequency = round(rng.uniform(1e-4, 0.2), 6)
            max_act = max(c["value"] for c in top)
            mean_act = round(max_act * rng.uniform(0.2, 0.6), 4)
            other = 1 - j
            latents[(j, m)] = {
                "member": j, "latent": m, "frequency": frequency, "max_activation": max_act,
                "mean_activation": mean_act,
                "histogram": {"edges": [i * max_act / 8 for i in range(9)],
                              "counts": [rng.randrange(50) for _ in range(8)]},
                "top": top,
                "quantiles": [{"quantile": q, "examples": [_context(rng, False) for _ in range(2)]}
                              for q in (0.5, 0.9)],
                "logits": {"promoted": [[" cat", 1.5], ["\n", 0.7]], "suppressed": [[" dog", -1.2]]} if m % 2 else None,
                "neighbours": [{"member": other, "latent": (m * 5) % LATENTS, "cosine": round(rng.uniform(0.2, 1), 3)}],
            }
            rows.append([j, m, frequency, max_act, mean_act, None])
    index = {
        "format": "saefast-browser", "version": 1, "title": "Synthetic browser",
        "model": {"kind": "bagging", "members": MEMBERS, "chains": 1, "latents_per_member": LATENTS,
                  "activation": "topk", "k": 4},
        "data": {"store": "/tmp/store", "hook": "blocks.3.hook_resid_post", "tokens": 123456, "lm": "toy-lm"},
        "columns": list(COLUMNS), "rows": rows,
        "ensemble": {"shared_threshold": 0.7, "shared_matrix": [[1.0, 0.42], [0.38, 1.0]], "stage_variance": None,
                     "classes": {"animals": [[0, 1], [1, 2]], "punctuation": [[0, 6]]}},
        "generated": {"saefast": "0.1.0"},
    }
    return index, latents


# ---------------------------------------------------------------- write_site without a browser


def test_write_site_writes_pages_assets_and_sharded_data(tmp_path):
    index, latents = _synthetic()
    before = copy.deepcopy(index)
    page = write_site(tmp_path / "site", index, latents, shard_size=5)
    site = tmp_path / "site"
    assert page == site / "index.html"
    for name in ("index.html", "latent.html", "assets/browser.css", "assets/browser.js", "data/index.js"):
        assert (site / name).is_file(), name
    n_rows = MEMBERS * LATENTS
    shards = sorted(p.name for p in (site / "data").glob("shard-*.js"))
    assert shards == [f"shard-{s:05d}.js" for s in range(-(-n_rows // 5))]
    text = (site / "data" / "index.js").read_text()
    assert text.startswith("window.SAEFAST_INDEX = {")
    assert [row[5] for row in _read_index(text)["rows"]] == [i // 5 for i in range(n_rows)]
    assert (site / "data" / "shard-00001.js").read_text().startswith("window.saefastShard(1, {")
    assert '"0/5":' in (site / "data" / "shard-00001.js").read_text()  # row 5 is member 0, latent 5
    assert index == before  # the caller's index is not modified
    # A smaller site written over it leaves no stale shards behind.
    write_site(site, index, latents)
    assert sorted(p.name for p in (site / "data").glob("shard-*.js")) == ["shard-00000.js"]
    assert not list(site.rglob("*.tmp"))


def _read_index(text: str) -> dict:
    import json

    return json.loads(text[len("window.SAEFAST_INDEX = ") :].rstrip().rstrip(";"))


def _drop(path):
    """A mutation deleting the key at ``path`` (a tuple of keys) from (index, latents)."""

    def mutate(index, latents):
        obj = {"index": index, "latents": latents}
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]

    return mutate


def _set(path, value):
    """A mutation setting the key at ``path`` to ``value``."""

    def mutate(index, latents):
        obj = {"index": index, "latents": latents}
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    "mutate, shard_size, message",
    [
        (None, 0, r"shard_size must be a positive int, got 0"),
        (None, 2.5, r"shard_size must be a positive int"),
        (_drop(("index", "title")), 256, r"index lacks the key\(s\) \['title'\]"),
        (_drop(("index", "model", "k")), 256, r"index\['model'\] lacks the key\(s\) \['k'\]"),
        (_set(("index", "format"), "other"), 256, r"format 'other'"),
        (_set(("index", "columns"), ["member"]), 256, r"index\['columns'\] must be"),
        (_drop(("latents", (1, 3))), 256, r"index\['rows'\]\[15\] is latent \(1, 3\), which has no entry in latents"),
        (_set(("latents", (5, 0)), {}), 256, r"latents has 1 entries without a row.*\(5, 0\)"),
        (_drop(("latents", (0, 2), "histogram")), 256, r"latents\[\(0, 2\)\] lacks the key\(s\) \['histogram'\]"),
        (_set(("latents", (0, 2), "top", 0, "focus"), 99), 256, r"latents\[\(0, 2\)\]\['top'\]\[0\]\['focus'\]"),
        (_set(("index", "ensemble", "shared_matrix"), [[1.0]]), 256, r"shared_matrix'\] must be 2 x 2"),
    ],
)
def test_write_site_rejects_bad_input_before_writing(tmp_path, mutate, shard_size, message):
    index, latents = _synthetic()
    if mutate is not None:
        mutate(index, latents)
    with pytest.raises(ValueError, match=message):
        write_site(tmp_path / "site", index, latents, shard_size=shard_size)
    assert not (tmp_path / "site").exists()


def test_a_duplicate_row_is_named(tmp_path):
    index, latents = _synthetic()
    index["rows"].append(list(index["rows"][0]))
    with pytest.raises(ValueError, match=r"latent \(0, 0\) appears twice"):
        write_site(tmp_path / "site", index, latents)


# ---------------------------------------------------------------- the pages in Chromium


def _chromium() -> str | None:
    """The system's Chromium (Debian: chromium; Ubuntu: chromium-browser), or None."""
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    """One headless system Chromium for the module; skips with the install command when it or playwright lacks."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser tests need playwright: .venv/bin/pip install --constraint constraints.txt playwright")
    executable = _chromium()
    if executable is None:
        pytest.skip("the browser tests need Chromium: sudo apt-get install chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The synthetic site, with shards of 5 rows (so the 24 latents span 5 shards)."""
    index, latents = _synthetic()
    return write_site(tmp_path_factory.mktemp("browser") / "site", index, latents, shard_size=5).parent


@pytest.fixture
def page(browser):
    """A fresh page that records console errors and uncaught exceptions; the test fails if any occurred."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.errors = errors
    yield page
    context.close()
    assert errors == []


@pytest.fixture
def screenshots(tmp_path) -> Path:
    """Where the screenshots go: $SAEFAST_SCREENSHOTS, else the test's tmp_path."""
    folder = Path(os.environ.get("SAEFAST_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _column(page, index: int) -> list[str]:
    """The text of column ``index`` (0-based) in the table's shown rows."""
    # textContent, not innerText: rows off screen are content-visibility: auto, and innerText skips them.
    cells = page.locator(f"#latent-table tbody tr td:nth-child({index + 1})")
    return cells.evaluate_all("els => els.map(e => e.textContent)")


def _rows(page) -> list[tuple[int, int]]:
    """(member, latent) of the table's shown rows, in order."""
    return list(zip(map(int, _column(page, 0)), map(int, _column(page, 1))))


def test_index_page_table_sorts_and_filters(page, site, screenshots):
    index, latents = _synthetic()
    page.goto((site / "index.html").as_uri())
    assert page.locator("#title").inner_text() == "Synthetic browser"
    assert page.locator("#latent-table tbody tr").count() == MEMBERS * LATENTS
    assert page.locator("#count").inner_text() == f"Showing {MEMBERS * LATENTS} of {MEMBERS * LATENTS} latents"
    # The ensemble views: the 2 x 2 heatmap with its values, and one list per class.
    assert page.locator("#shared svg rect").count() == MEMBERS * MEMBERS
    assert "0.42" in page.locator("#shared svg").inner_html()
    assert page.locator("#stages").is_hidden()
    assert page.locator("#classes a[href='latent.html#m=1&l=2']").count() == 1

    by_max = {key: entry["max_activation"] for key, entry in latents.items()}
    header = page.get_by_role("button", name="Max activation")
    header.click()
    shown = [by_max[key] for key in _rows(page)]
    assert shown == sorted(by_max.values(), reverse=True)
    assert page.locator("th", has=header).get_attribute("aria-sort") == "descending"
    header.focus()
    page.keyboard.press("Enter")  # the header is a button: the keyboard sorts too
    assert [by_max[key] for key in _rows(page)] == sorted(by_max.values())
    assert page.locator("th", has=header).get_attribute("aria-sort") == "ascending"

    page.select_option("#member-filter", "1")
    assert {member for member, _ in _rows(page)} == {1}
    assert page.locator("#latent-table tbody tr").count() == LATENTS
    page.fill("#min-max-activation", "4")
    expected = sum(1 for (j, _), v in by_max.items() if j == 1 and v >= 4)
    assert page.locator("#latent-table tbody tr").count() == expected
    assert page.locator("#count").inner_text().startswith(f"Showing {expected} of")
    page.fill("#min-max-activation", "")
    page.select_option("#member-filter", "")
    page.screenshot(path=str(screenshots / "index.png"), full_page=True)

    # A row's link opens that latent's page, with its contexts.
    member, latent = _rows(page)[0]
    page.locator("#latent-table tbody tr").first.locator("a").click()
    page.wait_for_url(re.compile(rf"latent\.html#m={member}&l={latent}$"))
    page.locator("#latent:not([hidden])").wait_for()
    assert page.locator("#heading").inner_text() == f"Member {member} · latent {latent}"
    assert page.locator("#top .context").count() == len(latents[(member, latent)]["top"])


def test_latent_page_shows_contexts_with_the_focus_on_the_argmax(page, site, screenshots):
    index, latents = _synthetic()
    page.goto((site / "latent.html").as_uri() + "#m=1&l=7")
    page.locator("#latent:not([hidden])").wait_for()
    entry = latents[(1, 7)]
    assert page.locator("#heading").inner_text() == "Member 1 · latent 7"
    contexts = page.locator("#top .context")
    assert contexts.count() == len(entry["top"])
    for i in range(contexts.count()):
        spans = contexts.nth(i).locator(".tok")
        values = [float(v) for v in spans.evaluate_all("els => els.map(e => e.dataset.activation)")]
        focused = spans.evaluate_all("els => els.findIndex(e => e.classList.contains('focus'))")
        assert values[focused] == max(values)
        titles = spans.evaluate_all("els => els.map(e => e.title)")
        assert len(titles) == TOKENS and all(":" in title for title in titles)  # the token and its activation
    # Whitespace is visible and the quantile examples and logit tables are shown.
    assert page.locator("#quantiles .context").count() == 4
    assert page.locator("#logits table").count() == 2
    assert page.locator("#histogram svg rect").count() == 8
    page.screenshot(path=str(screenshots / "latent.png"), full_page=True)


def test_every_neighbour_link_opens_its_latent(page, site):
    _, latents = _synthetic()
    page.goto((site / "latent.html").as_uri() + "#m=0&l=0")
    checked = 0
    for member in range(MEMBERS):
        for latent in range(LATENTS):
            page.evaluate(f"location.hash = 'm={member}&l={latent}'")
            page.wait_for_function(f"document.getElementById('heading').textContent === "
                                   f"'Member {member} · latent {latent}' && !document.getElementById('latent').hidden")
            links = page.locator("#neighbours a")
            hrefs = links.evaluate_all("els => els.map(e => e.getAttribute('href'))")
            assert len(hrefs) == len(latents[(member, latent)]["neighbours"])
            for n, href in zip(latents[(member, latent)]["neighbours"], hrefs):
                assert href == f"latent.html#m={n['member']}&l={n['latent']}"
            # Follow the first link: the same page re-renders on hashchange, the target latent is shown.
            target = latents[(member, latent)]["neighbours"][0]
            links.first.click()
            page.wait_for_function(f"document.getElementById('heading').textContent === "
                                   f"'Member {target['member']} · latent {target['latent']}'")
            assert page.locator("#latent").is_visible()
            assert page.locator("#message").is_hidden()
            checked += 1
    assert checked == MEMBERS * LATENTS


def test_an_unknown_latent_shows_a_message(page, site):
    page.goto((site / "latent.html").as_uri() + "#m=7&l=99")
    message = page.locator("#message")
    message.wait_for()
    assert "Unknown latent: member 7, latent 99" in message.inner_text()
    assert page.locator("#latent").is_hidden()
    page.locator("a", has_text="all latents").click()
    page.wait_for_url(re.compile(r"index\.html$"))
    assert page.locator("#latent-table tbody tr").count() == MEMBERS * LATENTS


def test_a_site_built_from_a_trained_ensemble(page, tmp_path, screenshots):
    """``saefast.browse.browse`` on a tiny trained bagging ensemble: the index lists every latent with no console
    error, and a latent page's top contexts highlight their argmax and link to the other member."""
    import torch

    import saefast as sf
    from saefast.browse import browse
    from saefast.data.store import write_store

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=generator) @ torch.randn(16, 16, generator=generator)
    ids = torch.randint(0, 40, (2000,), generator=generator, dtype=torch.int32)
    store = write_store(tmp_path / "store", x, extras={"token_ids": ids})
    model = sf.Ensemble.bagging(sf.SAEConfig(d_in=16, n_latents=20, k=3), 2, seed=0)
    sf.train(model, store.batches(256, epochs=None), steps=20, progress=False)
    summary = browse(model, store, tmp_path / "site", top_n=4, width=3, progress=False)
    page.goto(Path(summary["index"]).as_uri())
    assert page.locator("#latent-table tbody tr").count() == 2 * 20
    page.screenshot(path=str(screenshots / "trained_index.png"), full_page=True)
    fired = next(row for row in _rows_of(page) if row[2] > 0)
    page.locator("#latent-table tbody tr a").nth(_rows(page).index(fired[:2])).click()
    page.locator("#latent:not([hidden])").wait_for()
    contexts = page.locator("#top .context")
    assert contexts.count() >= 1
    for i in range(contexts.count()):
        spans = contexts.nth(i).locator(".tok")
        values = [float(v) for v in spans.evaluate_all("els => els.map(e => e.dataset.activation)")]
        assert values[spans.evaluate_all("els => els.findIndex(e => e.classList.contains('focus'))")] == max(values)
    page.screenshot(path=str(screenshots / "trained_latent.png"), full_page=True)
    link = page.locator("#neighbours a").first
    target = link.get_attribute("href").split("#", 1)[1]
    link.click()
    member, latent = (int(part.split("=")[1]) for part in target.split("&"))
    page.wait_for_function(f"document.getElementById('heading').textContent === 'Member {member} · latent {latent}'")
    assert member != fired[0] and page.locator("#message").is_hidden()


def _rows_of(page) -> list[tuple[int, int, float]]:
    """(member, latent, max activation) of the table's shown rows."""
    return [(j, m, float(v)) for (j, m), v in zip(_rows(page), _column(page, 3))]
