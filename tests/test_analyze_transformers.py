"""`rankbias analyze` on checkpoints written by Hugging Face `transformers` itself (GPT-2,
Llama with grouped-query attention, BERT, ViT, GPT-NeoX; random weights, some made low
rank), sharded, in safetensors and in .bin, against numpy float64 SVDs computed here from
the models' own weights: every rank, every split q/k/v and every per-head product.

Skipped with the reason where `transformers` is not installed.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from rankbias.analyze import sources
from rankbias.analyze import spectra as spectra_module
from rankbias.cli.main import main
from rankbias.metrics.attention import attention_products, product_singular_values

transformers = pytest.importorskip(
    "transformers", reason='transformers is not installed (pip install "rankbias[huggingface]")')
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TOL = 1e-3


def np_sigma(matrix) -> np.ndarray:
    return np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)


def np_rank(matrix, tol: float = TOL) -> int:
    return int(np.sum(np_sigma(matrix) > tol * np.linalg.norm(matrix)))


def make_low_rank(weight: torch.Tensor, rank: int, rows: slice = slice(None)) -> None:
    """Replace weight[rows] by a random matrix of exactly `rank`."""
    with torch.no_grad():
        part = weight[rows]
        part.copy_(torch.randn(part.shape[0], rank) @ torch.randn(rank, part.shape[1]) * 0.02)


# --- the models and what the oracle expects of them -----------------------------------------
def build(kind: str):
    """A small `transformers` model with random weights, some of them made low rank."""
    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=48, n_layer=2, n_head=4, vocab_size=96, n_positions=40))
        sd = model.state_dict()
        # Conv1D (in x out): the q columns of c_attn of layer 0 at rank 5, c_fc of layer 1 at 7
        make_low_rank(sd["transformer.h.0.attn.c_attn.weight"].T, 5, slice(0, 48))
        make_low_rank(sd["transformer.h.1.mlp.c_fc.weight"], 7)
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=80, tie_word_embeddings=False))
        sd = model.state_dict()
        make_low_rank(sd["model.layers.0.self_attn.k_proj.weight"], 5)
        make_low_rank(sd["model.layers.1.mlp.down_proj.weight"], 9)
    elif kind == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=80, max_position_embeddings=40))
        make_low_rank(model.state_dict()["bert.encoder.layer.0.attention.self.query.weight"], 4)
    elif kind == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=16, patch_size=4, num_labels=5))
        state = model.state_dict()  # transformers 5 renames ViT's modules in memory
        make_low_rank(state.get("vit.layers.1.mlp.fc1.weight",
                                state.get("vit.encoder.layer.1.intermediate.dense.weight")), 6)
    else:  # gpt_neox: q, k, v interleaved head by head in query_key_value
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            vocab_size=80))
        weight = model.state_dict()["gpt_neox.layers.0.attention.query_key_value.weight"]
        q_rows = torch.cat([torch.arange(h * 24, h * 24 + 8) for h in range(4)])
        with torch.no_grad():
            weight[q_rows] = torch.randn(32, 3) @ torch.randn(3, 32) * 0.02  # q at rank 3
    return model.eval()


def expected(kind: str, stored: dict) -> tuple[dict, dict, list]:
    """({row name: (matrix (out, in), role)}, {attention layer: (q, k, v, o, n_heads,
    n_kv_heads)}, the matrices left out of the average), written out for each model from
    its stored tensors (`stored_tensors`): independent of rankbias's rules."""
    w = {k: v.double().numpy() for k, v in stored.items()}
    rows, layers = {}, {}
    if kind == "gpt2":
        d = 48
        for i in range(2):
            p = f"transformer.h.{i}"
            qkv = w[f"{p}.attn.c_attn.weight"].T  # Conv1D: stored in x out
            for j, part in enumerate("qkv"):
                rows[f"{p}.attn.c_attn.weight.{part}"] = (qkv[j * d:(j + 1) * d],
                                                          f"attention_{part}")
            rows[f"{p}.attn.c_proj.weight"] = (w[f"{p}.attn.c_proj.weight"].T, "attention_o")
            rows[f"{p}.mlp.c_fc.weight"] = (w[f"{p}.mlp.c_fc.weight"].T, "mlp_in")
            rows[f"{p}.mlp.c_proj.weight"] = (w[f"{p}.mlp.c_proj.weight"].T, "mlp_out")
            layers[f"{p}.attn"] = (qkv[:d], qkv[d:2 * d], qkv[2 * d:],
                                   w[f"{p}.attn.c_proj.weight"].T, 4, 4)
        return rows, layers, ["transformer.wte.weight", "transformer.wpe.weight"]
    if kind == "llama":
        for i in range(2):
            p = f"model.layers.{i}"
            a = {x: w[f"{p}.self_attn.{x}_proj.weight"] for x in "qkvo"}
            rows.update({f"{p}.self_attn.{x}_proj.weight": (a[x], f"attention_{x}")
                         for x in "qkvo"})
            rows.update({f"{p}.mlp.{x}_proj.weight": (w[f"{p}.mlp.{x}_proj.weight"], role)
                         for x, role in [("gate", "mlp_gate"), ("up", "mlp_in"),
                                         ("down", "mlp_out")]})
            layers[f"{p}.self_attn"] = (a["q"], a["k"], a["v"], a["o"], 4, 2)
        return rows, layers, ["model.embed_tokens.weight", "lm_head.weight"]
    if kind in ("bert", "vit"):
        top = "bert" if kind == "bert" else "vit"
        self_attention = "attention.self" if kind == "bert" else "attention.attention"
        for i in range(2):
            p = f"{top}.encoder.layer.{i}"
            names = {"q": f"{p}.{self_attention}.query.weight",
                     "k": f"{p}.{self_attention}.key.weight",
                     "v": f"{p}.{self_attention}.value.weight",
                     "o": f"{p}.attention.output.dense.weight"}
            rows.update({n: (w[n], f"attention_{x}") for x, n in names.items()})
            rows[f"{p}.intermediate.dense.weight"] = (w[f"{p}.intermediate.dense.weight"],
                                                      "mlp_in")
            rows[f"{p}.output.dense.weight"] = (w[f"{p}.output.dense.weight"], "mlp_out")
            layers[f"{p}.attention"] = (*(w[names[x]] for x in "qkvo"), 4, 4)
        if kind == "bert":
            name = "cls.predictions.transform.dense.weight"
            rows[name] = (w[name], "linear")
            left_out = [f"bert.embeddings.{e}_embeddings.weight"
                        for e in ("word", "position", "token_type")]
            return rows, layers, left_out + ["cls.predictions.decoder.weight"]
        kernel = w["vit.embeddings.patch_embeddings.projection.weight"]
        rows["vit.embeddings.patch_embeddings.projection.weight"] = (
            kernel.reshape(kernel.shape[0], -1), "conv")
        return rows, layers, ["classifier.weight"]
    qkv = w["gpt_neox.layers.0.attention.query_key_value.weight"].reshape(4, 3, 8, 32)
    parts = {x: qkv[:, j].reshape(32, 32) for j, x in enumerate("qkv")}  # (head, part, dim)
    p = "gpt_neox.layers.0"
    rows = {f"{p}.attention.query_key_value.weight.{x}": (m, f"attention_{x}")
            for x, m in parts.items()}
    rows[f"{p}.attention.dense.weight"] = (w[f"{p}.attention.dense.weight"], "attention_o")
    rows[f"{p}.mlp.dense_h_to_4h.weight"] = (w[f"{p}.mlp.dense_h_to_4h.weight"], "mlp_in")
    rows[f"{p}.mlp.dense_4h_to_h.weight"] = (w[f"{p}.mlp.dense_4h_to_h.weight"], "mlp_out")
    layers = {f"{p}.attention": (parts["q"], parts["k"], parts["v"],
                                 w[f"{p}.attention.dense.weight"], 4, 4)}
    return rows, layers, ["gpt_neox.embed_in.weight", "embed_out.weight"]


def oracle_products(layers: dict) -> dict:
    """{"<layer>.head<h>.<qk|ov>": matrix}: W_Q^h^T W_K^g and W_O^h W_V^g, g = h // (n/n_kv)."""
    products = {}
    for name, (q, k, v, o, n, n_kv) in layers.items():
        hd = q.shape[0] // n
        for h in range(n):
            g = h // (n // n_kv)
            rows, kv_rows = slice(h * hd, (h + 1) * hd), slice(g * hd, (g + 1) * hd)
            products[f"{name}.head{h}.qk"] = q[rows].T @ k[kv_rows]
            products[f"{name}.head{h}.ov"] = o[:, rows] @ v[kv_rows]
    return products


def save(model, folder, fmt: str) -> None:
    """Sharded safetensors through save_pretrained; .bin as transformers 4 wrote it
    (transformers 5 writes safetensors only): the same tensors, under the same names, as
    huggingface_hub's torch shards and pytorch_model.bin.index.json."""
    model.save_pretrained(folder, max_shard_size="20KB")
    if fmt == "bin":
        tensors = stored_tensors(folder)
        for name in os.listdir(folder):
            if "safetensors" in name:
                os.remove(folder / name)
        hub.save_torch_state_dict(tensors, folder, safe_serialization=False,
                                  max_shard_size="20KB")


def stored_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's checkpoint files, read here with their own readers."""
    tensors = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            tensors.update(safetensors_torch.load_file(folder / name))
        elif name.endswith(".bin"):
            tensors.update(torch.load(folder / name, weights_only=True))
    return tensors


def stored_keys(folder) -> set[str]:
    return set(stored_tensors(folder))


KINDS = ["gpt2", "llama", "bert", "vit", "gpt_neox"]


@pytest.fixture(scope="module")
def models():
    return {kind: build(kind) for kind in KINDS}


def run_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["analyze", *map(str, args), "--format", "json", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # no progress bar with --no-progress, no warnings
    return json.loads(captured.out)


def assert_spectra(spectra, name, matrix) -> None:
    oracle = np_sigma(matrix)
    got = spectra[name]
    assert got.shape == oracle.shape, name
    np.testing.assert_allclose(got, oracle, rtol=0, atol=1e-9 * oracle[0], err_msg=name)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("kind", KINDS)
def test_sharded_checkpoints_match_the_numpy_oracle(models, kind, fmt, tmp_path, capsys,
                                                    monkeypatch):
    model, folder = models[kind], tmp_path / "model"
    save(model, folder, fmt)
    monkeypatch.setattr(sources, "REMAP_BYTES", 1)  # .bin: a fresh mapping for every read
    assert any(n.endswith(".index.json") for n in os.listdir(folder))  # really sharded
    spectra_path = tmp_path / "spectra.npz"
    report = run_json(capsys, folder, "--split-qkv", "--attention-products",
                      "--spectra", spectra_path)
    rows, layers, left_out = expected(kind, stored_tensors(folder))
    spectra = np.load(spectra_path)
    got = {r["name"]: r for r in report["layers"]}
    assert set(got) == set(rows)
    for name, (matrix, role) in rows.items():
        assert got[name]["shape"] == list(matrix.shape), name
        assert got[name]["role"] == role, name
        assert got[name]["rank"] == np_rank(matrix), name
        assert_spectra(spectra, name, matrix)
    assert report["average_rank"] == pytest.approx(np.mean([np_rank(m) for m, _ in
                                                            rows.values()]))
    keys = stored_keys(folder)
    assert set(report["left_out"]) == {n for n in left_out if n in keys}
    # nothing silently skipped: every stored tensor is analyzed or skipped with a reason
    analyzed = {r["tensor"] for r in report["layers"]}
    skipped = {s["name"]: s for s in report["skipped"]}
    assert analyzed | set(skipped) == keys and not analyzed & set(skipped)
    assert all(s["reason"] and s["shape"] is not None for s in skipped.values())
    products = {p["name"]: p for p in report["attention_products"]}
    oracle = oracle_products(layers)
    assert set(products) == set(oracle)
    for name, matrix in oracle.items():
        assert products[name]["rank"] == np_rank(matrix), name
        assert products[name]["shape"] == list(matrix.shape)
        assert_spectra(spectra, name, matrix)


def test_low_rank_parts_are_seen_where_the_model_put_them(models, tmp_path, capsys):
    """The split follows each model's layout: a wrong split would mix q rows with k/v."""
    for kind, name, rank in [("gpt2", "transformer.h.0.attn.c_attn.weight.q", 5),
                             ("gpt2", "transformer.h.1.mlp.c_fc.weight", 7),
                             ("llama", "model.layers.0.self_attn.k_proj.weight", 5),
                             ("gpt_neox", "gpt_neox.layers.0.attention.query_key_value.weight.q",
                              3)]:
        folder = tmp_path / kind
        if not folder.exists():
            save(models[kind], folder, "safetensors")
        ranks = {r["name"]: r["rank"] for r in run_json(capsys, folder, "--split-qkv")["layers"]}
        assert ranks[name] == rank
    # GQA: the 2 key heads of rank <= 5 serve 4 query heads; every q.k product has rank <= 5
    report = run_json(capsys, tmp_path / "llama", "--attention-products")
    layer0 = [p for p in report["attention_products"]
              if p["layer"] == "model.layers.0.self_attn" and p["kind"] == "qk"]
    assert len(layer0) == 4 and all(p["rank"] <= 5 for p in layer0)


def test_single_files_prefixes_and_the_average_convention(models, tmp_path, capsys):
    model = models["llama"]
    state = model.state_dict()
    rows, layers, left_out = expected("llama", state)
    # a single .safetensors file with DDP's prefix, config.json beside it; a torch.save
    # file with DDP's and torch.compile's, under "model" with nanoGPT-style model_args
    model.config.save_pretrained(tmp_path / "ddp")
    single = tmp_path / "ddp" / "weights.safetensors"
    safetensors_torch.save_file({f"module.{k}": v.contiguous() for k, v in state.items()},
                                str(single))
    compiled = tmp_path / "compiled.pt"
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in state.items()},
                "model_args": {"num_attention_heads": 4, "num_key_value_heads": 2,
                               "hidden_size": 32}}, compiled)
    for path in (single, compiled):
        report = run_json(capsys, path, "--attention-products")
        ranks = {r["name"]: r["rank"] for r in report["layers"]}
        assert ranks == {name: np_rank(m) for name, (m, _) in rows.items()}
        assert not any("module." in s["name"] or "_orig_mod" in s["name"]
                       for s in report["skipped"])
        assert {p["name"]: p["rank"] for p in report["attention_products"]} == {
            n: np_rank(m) for n, m in oracle_products(layers).items()}
    # a folder with one unsharded pytorch_model.bin
    one_bin = tmp_path / "one_bin"
    model.config.save_pretrained(one_bin)
    hub.save_torch_state_dict(state, one_bin, safe_serialization=False)
    assert (one_bin / "pytorch_model.bin").is_file()
    report = run_json(capsys, one_bin)
    assert {r["name"]: r["rank"] for r in report["layers"]} == {
        name: np_rank(m) for name, (m, _) in rows.items()}
    # --all: embeddings and the head are analyzed and averaged, with their roles
    report = run_json(capsys, compiled, "--all")
    got = {r["name"]: r for r in report["layers"]}
    assert got["lm_head.weight"]["role"] == "lm_head"
    assert got["model.embed_tokens.weight"]["role"] == "embedding"
    for name in left_out:
        assert got[name]["rank"] == np_rank(state[name].double().numpy())
    assert report["left_out"] == [] and report["matrices_averaged"] == len(rows) + 2


def test_include_exclude_and_the_skipped_count(models, tmp_path, capsys):
    folder = tmp_path / "llama"
    save(models["llama"], folder, "safetensors")
    report = run_json(capsys, folder, "--include", "*.mlp.*", "--exclude", "*.layers.1.*")
    assert {r["name"] for r in report["layers"]} == {
        f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    filtered = [s["name"] for s in report["skipped"] if "filtered" in s["reason"]]
    assert len(filtered) == 2 + 4 + 7  # embeddings and head, layer 0's attention, layer 1
    assert main(["analyze", str(folder), "--include", "*.mlp.*", "--no-progress"]) == 0
    table = capsys.readouterr().out
    n_skipped = len(stored_keys(folder)) - 6
    assert f"{n_skipped} tensors skipped: " in table and "10 filtered out by --include" in table


def test_tall_matrices_read_in_blocks_match_numpy(tmp_path, capsys, monkeypatch):
    """An embedding too large for one batch (32768 x 64, float64 16 MB) is reduced block by
    block (TSQR): its spectrum is still numpy's."""
    streamed = []
    blocks = spectra_module._tall_singular_values
    monkeypatch.setattr(spectra_module, "_tall_singular_values",
                        lambda matrix, *a: streamed.append(matrix.name) or blocks(matrix, *a))
    torch.manual_seed(1)
    emb = torch.randn(32768, 64)
    emb[:, :4] *= 1e-5  # four tiny singular values, below the tolerance
    path = tmp_path / "emb.safetensors"
    safetensors_torch.save_file({"embed_tokens.weight": emb, "fc.weight": torch.randn(8, 64)},
                                str(path))
    saved = tmp_path / "s.npz"
    report = run_json(capsys, path, "--all", "--spectra", saved)
    assert {r["name"]: r["rank"] for r in report["layers"]} == {
        "embed_tokens.weight": np_rank(emb.double().numpy()), "fc.weight": 8}
    assert report["layers"][0]["rank"] == 60 and streamed == ["embed_tokens.weight"]
    assert_spectra(np.load(saved), "embed_tokens.weight", emb.double().numpy())


def one_line_error(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["analyze", *map(str, args), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_checkpoints_are_one_line_errors(models, tmp_path, capsys):
    folder = tmp_path / "gpt2"
    save(models["gpt2"], folder, "safetensors")
    shards = sorted(folder.glob("model-*.safetensors"))
    bins = tmp_path / "bins"
    save(models["gpt2"], bins, "bin")
    # a truncated shard, garbage bytes, a missing shard, a broken index, a truncated .bin
    cut = tmp_path / "cut"
    save(models["gpt2"], cut, "safetensors")
    victim = sorted(cut.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    assert "cannot read" in one_line_error(capsys, cut)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert "garbage.safetensors" in one_line_error(capsys, garbage)
    shards[1].unlink()
    assert shards[1].name in one_line_error(capsys, folder)
    (folder / "model.safetensors.index.json").write_text("{not json")
    assert "index" in one_line_error(capsys, folder)
    shard = sorted(bins.glob("*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:200])
    assert "cannot read" in one_line_error(capsys, bins)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no checkpoint" in one_line_error(capsys, empty)


def test_no_matrix_is_an_error_not_an_empty_table(tmp_path, capsys):
    vectors = tmp_path / "norms.safetensors"
    safetensors_torch.save_file({"ln.weight": torch.ones(8), "ln.bias": torch.zeros(8),
                                 "step": torch.tensor(3)}, str(vectors))
    err = one_line_error(capsys, vectors)
    assert "no weight matrix" in err and "2 1-D" in err and "not floating point" in err
    matrices = tmp_path / "fc.safetensors"
    safetensors_torch.save_file({"fc1.weight": torch.randn(4, 4)}, str(matrices))
    assert "filtered out" in one_line_error(capsys, matrices, "--include", "nothing*")


def test_missing_head_layout_and_unknown_device_are_one_line_errors(models, tmp_path, capsys):
    path = tmp_path / "no_config.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in
                                 models["llama"].state_dict().items()}, str(path))
    assert "config.json" in one_line_error(capsys, path, "--attention-products")
    if not torch.cuda.is_available():
        assert "--device cpu" in one_line_error(capsys, path, "--device", "cuda")


def test_compress_refuses_hugging_face_folders(models, tmp_path, capsys):
    folder = tmp_path / "gpt2"
    save(models["gpt2"], folder, "safetensors")
    out = tmp_path / "small.pt"
    assert main(["compress", str(folder), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rankbias analyze" in err
    assert not out.exists()


def test_threads_give_the_same_spectra(models, tmp_path):
    from rankbias.analyze.analyze import analyze_path

    folder = tmp_path / "gpt2"
    save(models["gpt2"], folder, "safetensors")
    one, three = (analyze_path(folder, split_qkv=True, workers=w) for w in (1, 3))
    assert list(one.summaries) == list(three.summaries)
    for name, summary in one.summaries.items():
        np.testing.assert_array_equal(three.summaries[name].singular_values,
                                      summary.singular_values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_gives_the_cpu_spectra(models, tmp_path):
    from rankbias.analyze.analyze import analyze_path

    folder = tmp_path / "llama"
    save(models["llama"], folder, "safetensors")
    on = {d: analyze_path(folder, split_qkv=True, attention_products=True, device=d)
          for d in ("cpu", "cuda")}
    assert list(on["cpu"].summaries) == list(on["cuda"].summaries)
    for name, cpu in on["cpu"].summaries.items():
        assert on["cuda"].summaries[name].ranks == cpu.ranks
        np.testing.assert_allclose(on["cuda"].summaries[name].singular_values,
                                   cpu.singular_values, rtol=0,
                                   atol=1e-12 * cpu.singular_values[0])
    for cpu, gpu in zip(on["cpu"].products, on["cuda"].products):
        assert cpu["summary"].ranks == gpu["summary"].ranks


# --- memory: a child process reads the checkpoint, its peak RSS is bounded -----------------
CHILD = textwrap.dedent("""
    import json, sys
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    import torch
    torch.set_num_threads(1)
    from rankbias.cli.main import main
    import rankbias.analyze.analyze, safetensors.torch
    # the first SVD and QR page in LAPACK's code (~12 MB, a fixed cost): before the baseline
    torch.linalg.svdvals(torch.linalg.qr(torch.randn(300, 30, dtype=torch.float64)).R)
    baseline = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    if sys.argv[1] == "rankbias":
        assert main(["analyze", sys.argv[2], "--all", "--format", "json", "--no-progress",
                     "--spectra", sys.argv[3]]) == 0
    else:  # the control: every tensor in memory, as float64
        kept = [t.double() for t in safetensors.torch.load_file(sys.argv[2]).values()]
    print(json.dumps({"baseline": baseline, "peak": rss("VmHWM")}), file=sys.stderr)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_stays_far_below_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=384, n_layer=6, n_head=6, vocab_size=32000, n_positions=256))
    model.save_pretrained(tmp_path / "gpt2")
    path = tmp_path / "gpt2" / "model.safetensors"
    size = path.stat().st_size  # 91 MB; its embedding alone 49 MB (98 MB in float64)

    def peak(side: str) -> int:
        done = subprocess.run([sys.executable, "-c", CHILD, side, str(path),
                               str(tmp_path / "s.npz")], capture_output=True, text=True,
                              check=True)
        numbers = json.loads(done.stderr.strip().splitlines()[-1])
        return numbers["peak"] - numbers["baseline"]

    # the measurement sees a whole model in memory...
    assert peak("control") > size
    # ...and rankbias, analyzing every matrix of it (embeddings included), stays far below
    assert peak("rankbias") < size / 2
    spectra = np.load(tmp_path / "s.npz")
    wte = model.state_dict()["transformer.wte.weight"].double().numpy()
    assert_spectra(spectra, "transformer.wte.weight", wte)


# --- rankbias.metrics.attention on its own ----------------------------------------------------
def test_product_singular_values_and_gqa_products_match_numpy():
    torch.manual_seed(0)
    a, b = torch.randn(3, 40, 6), torch.randn(3, 6, 30)
    for x, y in [(a, b), (torch.randn(2, 5, 9), torch.randn(2, 9, 7))]:  # r < and >= min
        sigma = product_singular_values(x, y)
        for i in range(x.shape[0]):
            oracle = np_sigma((x[i].double() @ y[i].double()).numpy())
            np.testing.assert_allclose(sigma[i].numpy(), oracle, rtol=0, atol=1e-12 * oracle[0])
    q, k, v, o = torch.randn(24, 16), torch.randn(8, 16), torch.randn(8, 16), torch.randn(16, 24)
    products = attention_products(q.double(), k.double(), v.double(), o.double(), n_heads=6,
                                  n_kv_heads=2)
    oracle = oracle_products({"l": (*(t.double().numpy() for t in (q, k, v, o)), 6, 2)})
    for h in range(6):
        np.testing.assert_allclose(products["qk"][h].numpy(), oracle[f"l.head{h}.qk"],
                                   rtol=1e-6)
        np.testing.assert_allclose(products["ov"][h].numpy(), oracle[f"l.head{h}.ov"],
                                   rtol=1e-6)
