"""Tuned launch tables (vllm_glowq/kernels/tuned.py): which entry serves which token count, the
table a GPU gets, a table the microbenchmark writes read back as launches, and one clear error
for a table that cannot be used."""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from vllm_glowq.format import GlowQFormatError
from vllm_glowq.kernels import tuned
from vllm_glowq.kernels.w4a16 import MmaConfig

FIELDS = frozenset(field.name for field in fields(MmaConfig))
LAUNCH = {"block_n": 128, "block_t": 64, "split_k": 2, "num_warps": 4, "wgmma": True, "codes_in_smem": True}


def write_table(path: Path, layers: dict) -> Path:
    path.write_text(json.dumps({"device": "NVIDIA H200", "triton": "3.6.0", "command": "test", "layers": layers}))
    return path


def test_an_entry_serves_the_token_counts_above_half_of_its_own(tmp_path):
    table = tuned.load(write_table(tmp_path / "t.json", {"6144x4096": {"128": LAUNCH, "256": "dense"}}), FIELDS)
    assert tuned.lookup(table, 6144, 4096, 64) is None  # the rules below the table's smallest entry
    assert tuned.lookup(table, 6144, 4096, 65) == LAUNCH
    assert tuned.lookup(table, 6144, 4096, 128) == LAUNCH
    assert tuned.lookup(table, 6144, 4096, 129) == tuned.DENSE
    assert tuned.lookup(table, 6144, 4096, 257) is None  # and above its largest
    assert tuned.lookup(table, 4096, 6144, 100) is None  # N x K, not K x N
    assert MmaConfig(**tuned.lookup(table, 6144, 4096, 100)).codes_in_smem


def test_the_environment_variable_names_the_table_before_the_packaged_one(tmp_path, monkeypatch):
    monkeypatch.delenv(tuned.ENV_TUNED, raising=False)
    assert tuned.table_path("A GPU nobody tuned for") is None
    packaged = sorted(tuned.CONFIGS.glob("*.json"))
    for path in packaged:  # every packaged table loads with this version's launch fields
        assert tuned.table_path(path.stem.replace("_", " ")) == path
        assert tuned.load(path, FIELDS)
    monkeypatch.setenv(tuned.ENV_TUNED, str(tmp_path / "mine.json"))
    assert tuned.table_path("NVIDIA H200") == tmp_path / "mine.json"


@pytest.mark.parametrize("text,problem", [
    ("not json", "cannot read the launch table"),
    ('{"layers": {"6144by4096": {}}}', "cannot read the launch table"),
    ('{"layers": {"6144x4096": {"128": {"block_n": 64, "tile": 3}}}}', "unknown tile"),
    ('{"layers": {"6144x4096": {"128": "cublas"}}}', "unknown cublas"),
])
def test_an_unusable_table_fails_with_one_message_naming_it(tmp_path, text, problem):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(GlowQFormatError, match=problem) as error:
        tuned.load(path, FIELDS)
    assert str(path) in str(error.value) and tuned.ENV_TUNED in str(error.value)
    with pytest.raises(GlowQFormatError, match="cannot read"):
        tuned.load(tmp_path / "missing.json", FIELDS)


def test_the_microbenchmark_writes_a_table_the_plugin_reads(tmp_path):
    """A sweep's rows become launches, or dense where dequantize + cuBLAS was faster."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    kernel_microbench = pytest.importorskip("kernel_microbench")
    rows = [{"layer": "qkv_proj", "tokens": tokens, "n": 6144, "k": 4096, "us": {"glowq_dense": dense},
             "sweep": {"best": LAUNCH, "best_us": best}}
            for tokens, dense, best in ((256, 50.0, 40.0), (512, 60.0, 80.0))]
    result = {"device": "NVIDIA H200", "triton": "3.6.0", "rows": rows}
    table = kernel_microbench.launch_table(result, {"tokens": "256,512", "sweep_codes": "both", "out": "x"})
    assert table["command"] == "python bench/kernel_microbench.py --sweep-wgmma --tokens 256,512 --sweep-codes both"
    path = tmp_path / "t.json"
    kernel_microbench.write_launch_table(path, table)
    for row in rows:  # a second call sweeps another layer into the same table
        row.update(n=4096, k=14336)
    kernel_microbench.write_launch_table(path, kernel_microbench.launch_table(result, {"layers": "down_proj"}))
    loaded = tuned.load(path, FIELDS)
    for n, k in ((6144, 4096), (4096, 14336)):
        assert tuned.lookup(loaded, n, k, 200) == LAUNCH
        assert tuned.lookup(loaded, n, k, 300) == tuned.DENSE
    assert json.loads(path.read_text())["command"].endswith("--sweep-codes both; python bench/kernel_microbench.py "
                                                            "--sweep-wgmma --layers down_proj")


def test_the_front_end_refuses_a_bad_table_before_an_engine_starts(tmp_path, monkeypatch):
    """GlowQQuantConfig (built in the front-end process) reads VLLM_GLOWQ_TUNED_CONFIGS's table."""
    config = pytest.importorskip("vllm_glowq.config")
    from vllm_glowq.format import GlowQConfig

    glowq = GlowQConfig(group_size=128, rank=8)
    monkeypatch.setenv(tuned.ENV_TUNED, str(tmp_path / "missing.json"))
    with pytest.raises(GlowQFormatError, match="missing.json"):
        config.GlowQQuantConfig(glowq)
    monkeypatch.setenv(tuned.ENV_TUNED, str(write_table(tmp_path / "t.json", {"6144x4096": {"128": LAUNCH}})))
    assert config.GlowQQuantConfig(glowq).glowq is glowq
