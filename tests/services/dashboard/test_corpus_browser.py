"""The corpus page (/dashboard/corpora/{id}) in real Chromium against a real `excb up`-shaped app (control plane +
embed service in one process, served by uvicorn): build the index, search by an uploaded image (its own path comes
first), find planted near-duplicates, make a balanced subset; no JavaScript error, nothing off-origin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from services.corpus.parts import corpus_dir
from services.settings import EmbedSettings, Settings
from support.browser import Page, chromium
from support.corpus import curation_bundle, digits_folder, embed_corpus, planted_copies
from support.embed import UvicornThread

COPIES = 3


def test_corpus_page_search_dedup_subset(tmp_path: Path) -> None:
    from services.api.app import create_app
    from services.db import models as model_store
    from services.db.session import Database
    from services.db.tables import ModelRow

    data = tmp_path / "data"
    files = [p for p, _ in digits_folder(data / "digits", [10] * 10)]
    copies = planted_copies(files, data / "copies", COPIES, stride=31)
    models = tmp_path / "models"
    shutil.copytree(curation_bundle(), models / "m-cur")
    settings = Settings(home=tmp_path / "home", models_dir=models, data_roots=[data],
                        embed=EmbedSettings(max_delay_ms=1.0, warmup=False))
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    meta = json.loads((models / "m-cur" / "model.json").read_text())
    model_store.add_model(db, ModelRow(id="m-cur", job_id=None, owner=None, status="READY",
                                       bundle_dir=str(models / "m-cur"), sha256=meta["sha256"], model_json=meta))
    embed_corpus(models / "m-cur", files + [d for _, d in copies], corpus_dir(settings, "c1"), job_id="c1",
                 model_id="m-cur", owner=None)
    with UvicornThread(create_app(settings, embedded=True, db=db, reaper=False)) as server, chromium() as browser:
        page = Page(browser, SimpleNamespace(base=server.url))
        p = page.open("/dashboard/corpora/c1", "#corpus[data-state=ready]")
        assert page.attr("#corpus", "data-index") == "missing"
        p.click("#build-index")
        page.wait_attr("#corpus", "data-index", lambda v: v == "ready")
        assert "103 images indexed" in p.inner_text("#index-facts")

        query = files[42]
        p.set_input_files("#search-file", query)
        p.click("#search-form button[type=submit]")
        page.wait_attr("#search-results", "data-results", lambda v: v != "")
        first = p.query_selector("#search-hits li")
        assert first is not None and first.get_attribute("data-path") == query  # no keys: the server path as is
        assert p.query_selector("#search-hits li img").get_attribute("src").startswith("data:image/jpeg;base64,")

        p.click("#dedup-form button[type=submit]")
        groups = int(page.wait_attr("#dedup-results", "data-groups", lambda v: v != ""))
        text = p.inner_text("#dedup-results")
        assert groups >= COPIES and all(Path(c).name in text and o in text for o, c in copies), text

        p.fill("#subset-n", "30")
        p.select_option("#subset-strategy", "diverse")
        p.click("#subset-form button[type=submit]")
        page.wait_attr("#subset-results", "data-count", lambda v: v == "30")
        assert "list:" in p.inner_text("#subset-results")
        assert len(p.query_selector_all("#subset-results img.thumb")) == 24
        page.shot("corpus")
        page.close()
