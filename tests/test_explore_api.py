"""`explore`'s HTTP API on tiny models of the small world: every endpoint answers what the CLI's functions give
(the slider image is byte-identical to `amplify`'s, samples to `generate`'s files, curves to `logs`' table),
bad input gets a one-line message and the server keeps serving, tabs keep their own state, and the
rules hold (loopback host names, same-origin POSTs, the token off loopback, no asset from elsewhere)."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main
from helpers_explore import Client, png_of_data_url, session_server, start_server, stop
from PIL import Image
from test_gan_training import one_thread  # noqa: F401  (autouse: small networks on one thread)

from core.errors import UserError


@pytest.fixture(scope="module")
def server(small_world, tmp_path_factory):
    return session_server(tmp_path_factory)


@pytest.fixture(autouse=True)
def cache(server, monkeypatch):
    monkeypatch.setenv("BIOVIS_CACHE", str(server.sources.cache))


@pytest.fixture
def client(server):
    return Client(server.port)


@pytest.fixture
def cli(capsys, monkeypatch):
    return lambda *args: run_main(tuple(str(a) for a in args), capsys, monkeypatch)


def tab_of(server, kind: str) -> str:
    return next(tab for tab, view in server.app.views.items() if view.kind == kind)


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------------------------------------- sources, CLI


def test_sources_are_recognised_or_refused_in_one_line(server, tmp_path):
    from explore.sources import recognise, recognise_all
    from testing.retrieval.store import export_index

    s = server.sources
    assert recognise(s.bundle).kind == "concepts"
    assert recognise(s.runs / "viscoin").kind == "concepts"  # a `train viscoin` run
    assert recognise(s.retrieval).kind == "retrieval"
    assert recognise(s.phylo).kind == "phylo" and recognise(s.phylo / "phylo.safetensors").kind == "phylo"
    assert recognise(s.cvae).kind == "cvae"
    runs = recognise(s.runs)
    assert runs.kind == "runs" and {p.name for p in runs.runs} == {"clf", "viscoin"}
    # an index folder joins the model it was built with, or opens that model alone
    index = export_index(server.view("retrieval").index, tmp_path / "index")
    paired = recognise_all([s.retrieval, index])
    assert len(paired) == 1 and paired[0].index == index
    alone = recognise_all([index])
    assert alone[0].kind == "retrieval" and alone[0].index == index and alone[0].path == s.retrieval
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    for path, words in ((tmp_path / "notes.txt", "not something explore opens"),
                        (tmp_path / "empty", "holds no run"),
                        (s.runs / "gan.safetensors", "checkpoint; explore opens"),
                        (tmp_path / "missing", "does not exist")):  # fmt: skip
        with pytest.raises(UserError, match=words):
            recognise(path)


def test_cli_refuses_its_own_bad_arguments_in_one_line(server, cli, tmp_path):
    s = server.sources
    (tmp_path / "notes.txt").write_text("not a model")
    one_line_error(cli("explore", tmp_path / "nothing-here"), "does not exist")
    one_line_error(cli("explore", tmp_path / "notes.txt", "--port", "0"), "not something explore opens")
    one_line_error(cli("explore", s.bundle, "--port", "70000"), "--port must be in 0..65535")
    one_line_error(cli("explore", s.bundle, "--token", "short"), "--token must be 16-128 characters")
    one_line_error(cli("explore", s.bundle, "--max-upload-mb", "0"), "--max-upload-mb must be positive")
    one_line_error(cli("explore", s.bundle, "--port", "0", "--split", "nosuch"), "nosuch")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        one_line_error(
            cli("explore", s.bundle, "--port", port), f"cannot listen on 127.0.0.1:{port}", "--port"
        )


# ---------------------------------------------------------------------------------------------- the worker


def test_worker_runs_only_the_latest_request_of_a_slot():
    from explore.worker import InferenceWorker, Superseded

    worker = InferenceWorker()
    gate, ran = threading.Event(), []
    try:
        blocker = worker.submit("busy", lambda: gate.wait(30) and ran.append("first"))
        drags = [worker.submit(("tab-a", "render"), lambda i=i: ran.append(i)) for i in range(5)]
        other = worker.submit(("tab-b", "render"), lambda: ran.append("b"))
        gate.set()
        for job in (blocker, *drags, other):
            assert job.done.wait(30)
        assert ran == ["first", 4, "b"]  # the slider's last value only, and the other tab's request in turn
        assert all(isinstance(job.error, Superseded) for job in drags[:4]) and worker.dropped == 4
        with pytest.raises(ZeroDivisionError):  # a request's error reaches its caller; the worker goes on
            worker.run(None, lambda: 1 / 0)
        assert worker.run(None, lambda: 42) == 42
    finally:
        worker.stop()


# ---------------------------------------------------------------------------------------------- concepts


def amplify_reference(analysis, index: int, concepts: list[int], multiplier: float):
    """What `amplify --image-indices INDEX --concept-indices ... --multipliers M` decodes (its functions)."""
    from testing.viscoin.amplify import amplify_images, plan_amplify, resolve_selection

    plan = plan_amplify(
        analysis, [index], resolve_selection(analysis.models.n_concepts, indices=concepts), [multiplier]
    )
    return amplify_images(plan, analysis.models, analysis.device, quiet=True)


def png_of(images) -> bytes:
    from datasets.transforms import to_uint8_images
    from testing.sampling import png_bytes

    return png_bytes(to_uint8_images(images)[0])


def test_slider_image_is_amplify_s_image_byte_for_byte(server, client, tmp_path):
    from testing.viscoin.amplify import Selection, encode_images, plan_encoded

    t = tab_of(server, "concepts")
    analysis = server.view("concepts").analysis
    index = 5
    status, chosen = client.post(f"/api/{t}/select", {"index": index})
    assert status == 200, chosen
    images, *codes = encode_images(analysis, [index])
    plan = plan_encoded(
        analysis.models, analysis.device, [index], images, codes, Selection("threshold", 0.2), []
    )
    assert chosen["selected"] == sorted(plan.selected[0].nonzero().flatten().tolist(),
                                        key=lambda k: -float(plan.normalised[0, k]))  # fmt: skip
    assert np.allclose(chosen["relevance"], plan.normalised[0].numpy(), atol=1e-5)
    assert chosen["target"] == int(codes[2].argmax()) and len(chosen["top_f"]) == 5

    k = int(plan.normalised[0].argmax())  # the most relevant concept, at 2.5; every other concept at 1
    sliders = {str(c): 1.0 for c in chosen["selected"]} | {str(k): 2.5}
    status, out = client.post(f"/api/{t}/render", {"multipliers": sliders})
    assert status == 200, out
    reference = amplify_reference(analysis, index, [k], 2.5)
    assert png_of_data_url(out["image"]) == png_of(reference["images_selected"][0])
    assert out["p"] == pytest.approx(float(reference["p_selected"][0, 0]), abs=1e-6)
    assert out["image"] != chosen["reconstruction"]  # the slider changed the image
    assert png_of_data_url(chosen["reconstruction"]) == png_of(reference["reconstruction"])
    status, plain = client.post(f"/api/{t}/render", {"multipliers": {}})
    assert plain["image"] == chosen["reconstruction"] and plain["p"] == chosen["p_reconstruction"]

    # the amplify command itself, on that image with those multipliers: the same probability in its CSV
    from helpers_viscoin import invoke

    code, output = invoke("amplify", "--bundle", server.sources.bundle, "--image-indices", index, "--concept-indices",
                          k, "--multipliers", "0,2.5", "--device", "cpu", "--out", tmp_path / "amp", "-q")  # fmt: skip
    assert code == 0, output
    import pandas as pd

    table = pd.read_csv(tmp_path / "amp" / "amplify.csv")
    assert out["p"] == pytest.approx(
        float(table.loc[table["multiplier"] == 2.5, "p_selected"].iloc[0]), abs=1e-6
    )


def test_explaining_another_class_and_heat_maps(server, client):
    t = tab_of(server, "concepts")
    view = server.view("concepts")
    _, chosen = client.post(f"/api/{t}/select", {"index": 12})
    other = next(c["class"] for c in chosen["top_theta"] if c["class"] != chosen["target"])
    status, explained = client.post(f"/api/{t}/explain", {"target": other})
    assert status == 200 and explained["target"] == other and explained["original"] == chosen["original"]
    weight = view.models.explainer.linear.weight[other].float()
    activation = torch.tensor(explained["activation"])
    assert np.allclose(explained["raw_relevance"], (activation * weight).numpy(), atol=1e-4)
    status, heat = client.post(f"/api/{t}/heatmap", {"concept": 3})
    assert status == 200 and heat["concept"] == 3
    picture = Image.open(io.BytesIO(png_of_data_url(heat["image"])))
    assert picture.size == (32, 32) and heat["image"] != chosen["original"]
    assert heat["activation"] == pytest.approx(activation[3].item(), abs=1e-5)


def test_two_browser_tabs_keep_their_own_image(server):
    t = tab_of(server, "concepts")
    a, b = Client(server.port, "tab-aaaaaaaa"), Client(server.port, "tab-bbbbbbbb")
    _, first = a.post(f"/api/{t}/select", {"index": 3})
    _, second = b.post(f"/api/{t}/select", {"index": 40})
    _, render_a = a.post(f"/api/{t}/render", {"multipliers": {}})
    _, render_b = b.post(f"/api/{t}/render", {"multipliers": {}})
    assert render_a["image"] == first["reconstruction"] and render_b["image"] == second["reconstruction"]
    assert first["reconstruction"] != second["reconstruction"]
    status, fresh = Client(server.port, "tab-cccccccc").post(f"/api/{t}/render", {"multipliers": {}})
    assert status == 400 and "choose an image first" in fresh["error"]


def test_concept_card_reads_the_concepts_cache(server, client):
    import time

    from datasets.cub import read_attributes
    from testing.viscoin.concepts import concept_arrays
    from testing.viscoin.metrics import attribute_auc

    t = tab_of(server, "concepts")
    view = server.view("concepts")
    status, card = client.get(f"/api/{t}/card?concept=2")
    assert status == 200 and card["status"] in ("computing", "ready")
    deadline = time.time() + 120
    while card["status"] == "computing" and time.time() < deadline:
        assert "computing concept activations" in card["message"]
        time.sleep(0.2)
        _, card = client.get(f"/api/{t}/card?concept=2")
    assert card["status"] == "ready", card
    cached = concept_arrays(view.analysis, quiet=True)
    assert cached.hit  # the page filled the cache `concepts` reads
    acts, index = cached.arrays["activations"], cached.arrays["index"]
    expected = index[np.argsort(-acts[:, 2], kind="stable")[:8]]
    assert [im["index"] for im in card["images"]] == expected.tolist()
    data = view.analysis.data
    names, matrix = read_attributes(data.root, len(data.meta.paths))
    auc = attribute_auc(
        torch.from_numpy(acts), torch.from_numpy(matrix[data.indices[index]].astype(np.float32))
    )
    assert card["has_attributes"] and len(card["attributes"]) == 5
    for row in card["attributes"]:
        assert row["auc"] == pytest.approx(float(auc[2, names.index(row["name"])]), abs=1e-4)


def test_uploads_and_bad_inputs_get_a_message_and_the_server_keeps_serving(server, client, monkeypatch):
    t = tab_of(server, "concepts")
    view = server.view("concepts")
    path = view.analysis.data.image_path(7)
    status, uploaded = client.upload(f"/api/{t}/select", path.read_bytes(), "bird.png")
    _, by_index = client.post(f"/api/{t}/select", {"index": 7})
    assert (
        status == 200 and uploaded["image_id"] == "bird.png" and uploaded["original"] == by_index["original"]
    )

    k = view.models.n_concepts
    bad = [
        ("select", {"index": 10_000}, "index must be in 0..63"),
        ("select", {"index": "seven"}, "index must be a whole number"),
        (
            "render",
            {"multipliers": {str(k + 3): 1.0}},
            f"concept {k + 3} is out of range: the bundle has K={k}",
        ),
        ("render", {"multipliers": {"0": -1}}, "multiplier of concept 0 must be a finite number in [0, 16]"),
        ("render", {"multipliers": {"0": "nan"}}, "must be a finite number"),
        ("render", {"multipliers": [1, 2]}, "multipliers must map concept indices"),
        ("heatmap", {"concept": -1}, "concept -1 is out of range"),
        ("explain", {"target": 99}, "target must be in 0..7"),
    ]
    for action, body, words in bad:
        status, answer = client.post(f"/api/{t}/{action}", body)
        assert status == 400 and words in answer["error"], (action, answer)
    for data, words in ((b"GIF89a not really", "is not an image that can be read"), (b"", "is empty")):
        status, answer = client.upload(f"/api/{t}/select", data, "notes.png")
        assert status == 400 and words in answer["error"], answer
    status, answer = client.get(f"/api/{t}/card?concept=x")
    assert status == 400 and "whole number" in answer["error"]
    status, _, body = client.request(
        "POST", f"/api/{t}/render", b"{not json", {"Content-Type": "application/json"}
    )
    assert status == 400 and b"not JSON" in body
    monkeypatch.setattr(server.app.options, "max_upload", 1000)
    status, answer = client.upload(f"/api/{t}/select", b"\x89PNG" + bytes(3000), "big.png")
    assert status == 413 and "the limit is" in answer["error"]
    assert client.get(f"/api/{t}/nothing")[0] == 404 and client.get("/api/t99/image?i=0")[0] == 404
    assert client.get(f"/api/{t}/render")[0] == 405
    status, _, body = client.request("POST", f"/api/{t}/select", b"{}", {"Content-Type": "application/json",
                                                                         "X-Explore-Session": ""})  # fmt: skip
    assert status == 400
    # a bug in a handler: 500 with a short note, and the server keeps serving
    monkeypatch.setattr(view, "actions", lambda: {"boom": ("GET", lambda request: 1 / 0)})
    status, answer = client.get(f"/api/{t}/boom")
    assert status == 500 and "ZeroDivisionError" in answer["error"]
    monkeypatch.undo()
    status, tabs = client.get("/api/tabs")
    assert status == 200 and [tab["kind"] for tab in tabs["tabs"]] == [
        "concepts",
        "retrieval",
        "phylo",
        "cvae",
        "runs",
    ]
    status, image = client.get(f"/api/{t}/image?i=3")
    assert status == 200 and image.startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------------- retrieval


def test_retrieval_queries_are_retrieve_query_s(server, client):
    import h5py

    from datasets.bioscan.hdf5 import read_labels
    from testing.retrieval.plots import pca_2d
    from testing.retrieval.query import run_query

    t = tab_of(server, "retrieval")
    view = server.view("retrieval")
    data = server.sources.retrieval_data
    labels = read_labels(data, "all_keys")
    with h5py.File(data) as f:
        barcode = f["all_keys"]["barcode"][4].decode()
        photo = f["all_keys"]["image"][4, : f["all_keys"]["image_mask"][4]].tobytes()
    status, out = client.post(f"/api/{t}/query", {"dna": barcode.lower(), "keys": "dna", "k": 5})
    assert status == 200, out
    (answer,) = out["results"]
    assert answer["neighbours"][0]["id"] == labels["id"][4] and answer["neighbours"][0]["row"] == 4
    assert answer["prediction"]["species"]["label"] == labels["species"][4]
    (expected,) = list(run_query(view.net, view.index, [], [("barcode", barcode)], "dna", 5, None, "cpu"))
    assert [n["id"] for n in answer["neighbours"]] == [n["id"] for n in expected["neighbours"]]
    assert [n["score"] for n in answer["neighbours"]] == pytest.approx(
        [n["score"] for n in expected["neighbours"]], abs=1e-6
    )

    fasta = f">first\n{barcode[:300]}\n{barcode[300:]}\n>reverse\n{barcode[::-1]}\n"
    _, out = client.post(f"/api/{t}/query", {"dna": fasta, "k": 3})
    assert [r["query"] for r in out["results"]] == ["first", "reverse"] and len(
        out["results"][0]["neighbours"]
    ) == 3
    status, out = client.upload(f"/api/{t}/query?keys=image&k=3", photo, "specimen.jpg")
    assert status == 200 and out["results"][0]["query"] == "specimen.jpg"
    assert out["results"][0]["neighbours"][0]["id"] == labels["id"][4]
    status, out = client.post(f"/api/{t}/point", {"modality": "dna", "row": 9, "keys": "dna", "k": 2})
    assert status == 200 and out["results"][0]["neighbours"][0]["row"] == 9
    assert out["results"][0]["best_score"] == pytest.approx(1.0, abs=2e-3)

    status, projection = client.get(f"/api/{t}/projection?rank=family")
    keys = np.concatenate(
        [np.asarray(view.index.keys(m), dtype=np.float32) for m in projection["modalities"]]
    )
    assert np.allclose(np.c_[projection["x"], projection["y"]], pca_2d(keys), atol=1e-3)
    assert projection["taxa"] == sorted(set(labels["family"]))
    status, thumb = client.get(f"/api/{t}/thumb?row=4")
    assert status == 200 and thumb.startswith(b"\x89PNG")

    bad = [({"dna": "ACGTZACGT"}, "character 'Z' at position 5"), ({"dna": "  "}, "paste a DNA barcode"),
           ({"dna": ">only a name\n"}, "record 'only a name' has no sequence lines"),
           ({"dna": "ACGT", "keys": "smell"}, "keys 'smell'"), ({"dna": "ACGT", "k": 0}, "k (neighbours) must be in 1..50"),
           ({"modality": "dna", "row": 10_000}, "row must be in")]  # fmt: skip
    for body, words in bad:
        status, answer = client.post(f"/api/{t}/{'point' if 'row' in body else 'query'}", body)
        assert status == 400 and words in answer["error"], answer
    status, answer = client.post(f"/api/{t}/query", {"dna": "ACGTZACGT", "unknown_as_n": True})
    assert status == 200
    status, answer = client.upload(f"/api/{t}/query?keys=image", b"%PDF-1.4", "paper.pdf")
    assert status == 400 and "'paper.pdf' is not an image" in answer["error"]
    assert client.get(f"/api/{t}/projection?rank=kingdom")[0] == 400


# ---------------------------------------------------------------------------------------------- generation


def pngs_of(folder: Path) -> list[bytes]:
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return [(folder / row["file"]).read_bytes() for row in rows]


def test_phylo_node_samples_are_generate_phylo_s_files(server, client, cli, tmp_path):
    from datasets.phylogeny import name_key

    t = tab_of(server, "phylo")
    view = server.view("phylo")
    nodes = {n["label"]: n for n in server.app.describe()["tabs"][2]["tree"]["nodes"]}
    assert {name_key(label) for label, n in nodes.items() if n["leaf"]} == set(view.levels.species)
    node = view.levels.groups[1][0]
    assert nodes[node]["level"] is not None
    status, out = client.post(f"/api/{t}/sample", {"node": node, "n": 3, "seed": 5})
    assert status == 200 and len(out["images"]) == 3, out
    result = cli("generate", "phylo", "-c", server.sources.phylo, "--node", node, "--n", "3", "--seed", "5",
                 "--device", "cpu", "--out", tmp_path / "gen", "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [png_of_data_url(u) for u in out["images"]] == pngs_of(tmp_path / "gen")
    assert out["command"].startswith(
        f"python main.py generate phylo -c {server.sources.phylo} --node '{node}'"
    )
    from testing.generation import TOP_K

    assert server.app.describe()["tabs"][2]["top_k"] == TOP_K  # the page's default is generate's
    for body, words in (({"node": "Nowhere"}, "no node 'Nowhere'"), ({"node": node, "n": 0}, "n must be in 1..64"),
                        ({"node": node, "temperature": 0}, "temperature must be"), ({}, "click a node")):  # fmt: skip
        status, answer = client.post(f"/api/{t}/sample", body)
        assert status == 400 and words in answer["error"], answer


def test_cvae_samples_and_sliders_are_generate_s_images(server, client, cli, tmp_path):
    t = tab_of(server, "cvae")
    view = server.view("cvae")
    name = view.meta["class_names"][2]
    status, out = client.post(f"/api/{t}/sample", {"class": 2, "n": 3, "seed": 7})
    assert status == 200 and len(out["images"]) == 3 and len(out["dims"]) == 6, out
    result = cli("generate", "cvae", "-c", server.sources.cvae, "--class", name, "--n", "3", "--seed", "7",
                 "--device", "cpu", "--out", tmp_path / "cvae", "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [png_of_data_url(u) for u in out["images"]] == pngs_of(tmp_path / "cvae")

    # a slider at 1.0 on dimension 3 = the frame at 1.0 of `generate traverse --dims 3 --span 2 --steps 5`
    status, slid = client.post(f"/api/{t}/traverse", {"class": 2, "seed": 7, "eps": {"3": 1.0}})
    assert status == 200
    result = cli("generate", "traverse", "-c", server.sources.cvae, "--class", name, "--dims", "3", "--span", "2",
                 "--steps", "5", "--seed", "7", "--device", "cpu", "--out", tmp_path / "trav", "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert png_of_data_url(slid["image"]) == pngs_of(tmp_path / "trav")[3]
    bad = [("sample", {"class": 99}, "class must be in 0..7"), ("traverse", {"eps": {"999": 1}}, "latent dimension must be in"),
           ("traverse", {"eps": {"0": 50}}, "value of dimension 0 must be"), ("sample", {"attributes": {"9999": 1}}, "attribute index"),
           ("sample", {"n": 0}, "n must be in 1..64"), ("sample", {"seed": -1}, "seed must be in")]  # fmt: skip
    for action, body, words in bad:
        status, answer = client.post(f"/api/{t}/{action}", body)
        assert status == 400 and words in answer["error"], (action, answer)


# ---------------------------------------------------------------------------------------------- runs


def test_runs_curves_are_the_logs_numbers_and_follow_a_growing_log(server, client, tmp_path):
    import shutil

    from core.runlog import read_log
    from explore.sources import recognise
    from explore.views import Context, Request
    from explore.views.runs import RunsView
    from testing.runlogs import long_table

    t = tab_of(server, "runs")
    status, listing = client.get(f"/api/{t}/list")
    names = [run["name"] for run in listing["runs"]]
    assert status == 200 and names == ["clf", "viscoin"]
    assert [run["status"] for run in listing["runs"]] == ["finished", "finished"]
    status, curves = client.get(f"/api/{t}/curves?runs=0,1")
    assert status == 200 and not curves["problems"]
    table = long_table(read_log(server.sources.runs / "clf"))
    series = {
        (s["metric"], s["split"]): s for p in curves["panels"] for s in p["series"] if s["name"] == "clf"
    }
    for (metric, split), group in table.groupby(["metric", "split"]):
        assert series[(metric, split)]["x"] == group["step"].tolist()
        assert np.allclose(series[(metric, split)]["y"], group["value"].to_numpy(), rtol=1e-6)
    assert {p["panel"]: p["ylabel"] for p in curves["panels"]}["acc"] == "top-1 accuracy (fraction)"
    assert {row["metric"] for row in curves["summary"] if row["name"] == "clf"} == set(table["metric"])
    assert client.get(f"/api/{t}/curves?runs=0,1&since={curves['signature']}")[1] == {
        "unchanged": True, "signature": curves["signature"]}  # fmt: skip
    assert client.get(f"/api/{t}/curves?runs=7")[0] == 400

    # a run still training: its log grows, the next refresh shows the new point
    shutil.copytree(server.sources.runs / "clf", tmp_path / "runs" / "live")
    view = RunsView("tx", recognise(tmp_path / "runs"), Context(None, "cpu", None))
    first = view.curves(Request({"runs": "0"}))
    with open(tmp_path / "runs" / "live" / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 10_000, "split": "val", "time": 0.0, "acc": 0.5}) + "\n")
    assert view.curves(Request({"runs": "0", "since": first["signature"]})).get("unchanged") is None
    again = view.curves(Request({"runs": "0"}))
    acc = next(
        s for p in again["panels"] for s in p["series"] if s["metric"] == "acc" and s["split"] == "val"
    )
    assert acc["x"][-1] == 10_000 and acc["y"][-1] == 0.5


# ---------------------------------------------------------------------------------------------- the rules


def test_page_assets_are_all_served_here(server, client):
    from explore.server import STATIC

    texts = {p.name: p.read_text() for p in STATIC.iterdir()}
    for name, text in texts.items():
        elsewhere = [
            u
            for u in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", text)
            if "www.w3.org/2000/svg" not in u
        ]
        assert not elsewhere, (name, elsewhere)
    for src in re.findall(r'(?:src|href)="([^"]+)"', texts["index.html"]):
        assert src.startswith("/static/"), src
        assert client.request("GET", src)[0] == 200, src
    status, headers, _ = client.request("GET", "/")
    assert status == 200 and "default-src 'none'" in headers["Content-Security-Policy"]
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    for path in ("/static/../server.py", "/static/nothing.js", "/etc/passwd", "/static/%2e%2e/app.py"):
        assert client.request("GET", path)[0] == 404, path


def test_loopback_server_answers_loopback_names_and_same_origin_posts_only(server, client):
    assert client.request("GET", "/", headers={"Host": "evil.example:80"})[0] == 403  # DNS rebinding
    assert (
        client.request("GET", "/api/tabs", headers={"Host": f"localhost:{server.port + 1}"})[0] == 200
    )  # ssh -L
    t = tab_of(server, "concepts")
    status, answer = client.post(f"/api/{t}/select", {"index": 1}, Origin="http://evil.example")
    assert status == 403 and "cross-origin" in answer["error"]
    assert client.post(f"/api/{t}/select", {"index": 1}, Origin=f"http://127.0.0.1:{server.port}")[0] == 200


def test_refused_requests_leave_a_kept_alive_connection_usable(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        for method, path, status in (("POST", "/api/t99/select", 404), ("POST", "/static/app.js", 200),
                                     ("POST", "/api/t0/image", 405), ("GET", "/api/tabs", 200)):  # fmt: skip
            conn.request(method, path, body=b'{"index": 1}', headers={"Content-Type": "application/json",
                                                                      "X-Explore-Session": "keep-alive-test"})  # fmt: skip
            response = conn.getresponse()
            response.read()
            assert response.status == status and not response.will_close, (method, path, response.status)
    finally:
        conn.close()


def test_off_loopback_every_request_needs_the_token(server, capsys):
    other = start_server(server.sources, host="0.0.0.0", paths=[server.sources.runs])
    try:
        token = other.server.token
        assert token and len(token) >= 24 and f"?token={token}" in capsys.readouterr().out
        plain = Client(other.port)
        for path in ("/", "/api/tabs", "/static/app.js", "/?token=wrong-token-of-the-same-size"):
            assert plain.request("GET", path)[0] == 403, path
        status, headers, _ = plain.request("GET", f"/?token={token}")
        assert status == 303 and headers["Location"] == "/" and "HttpOnly" in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";")[0]
        assert plain.request("GET", "/", headers={"Cookie": cookie})[0] == 200
        assert plain.request("GET", "/api/tabs", headers={"Authorization": f"token {token}"})[0] == 200
        status, _, body = plain.request("GET", "/api/t0/list", headers={"Cookie": cookie})
        assert status == 200 and json.loads(body)["runs"]
    finally:
        stop(other)
