"""Every shipped config loads and validates; bad keys and values fail with one line naming the key."""

from pathlib import Path

import pytest

from posttrain.config import ConfigError, PipelineConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {path.name for path in CONFIGS}
    assert {"demo.yaml", "smoke.yaml", "qwen2.5-0.5b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.run_name == path.stem
    assert cfg.data.sources


def test_qwen_config_loads_a_model_id_with_lora():
    cfg = load_config(CONFIGS[0].parent / "qwen2.5-0.5b.yaml")
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B"
    assert cfg.sft.method == "lora"
    assert cfg.model.trust_remote_code is False


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sft.lrr=1", "sft.lrr: unknown key"),
        ("sft.lr=abc", "sft.lr: Input should be a valid number"),
        ("align.methods=[dpo, rlhf]", "align.methods: method 'rlhf' is not implemented; available: dpo, ppo, grpo"),
        ("align.methods=[dpo, dpo]", "align.methods: a method is listed twice"),
        ("align.grpo.group_size=1", "align.grpo.group_size: Input should be greater than or equal to 2"),
        ("sft.method=dora", "sft.method: Input should be 'full', 'lora' or 'qlora'"),
        ("data.sources=[]", "data.sources: List should have at least 1 item"),
        ("sft.max_steps=0", "sft.max_steps: Input should be greater than or equal to 1"),
    ],
)
def test_bad_values_name_the_key_in_one_line(override, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIGS[0].parent / "demo.yaml", [override])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(CONFIGS[0].parent / "demo.yaml"))
    assert expected in message


def test_override_sets_nested_values_with_yaml_types(tmp_path):
    cfg = load_config(CONFIGS[0].parent / "demo.yaml", ["sft.lr=1e-4", "evaluate.max_new_tokens=7", "sft.lora.r=4"])
    assert cfg.sft.lr == pytest.approx(1e-4)
    assert cfg.evaluate.max_new_tokens == 7
    assert cfg.sft.lora.r == 4


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ("[{role: preference, generate: {rows: 9}}, {role: prompt, generate: {rows: 9}}]", "no source gives instruction rows, which sft, distill read"),
        ("[{role: instruction, generate: {rows: 9}}, {role: prompt, generate: {rows: 9}}]", "no source gives preference rows, which reward, align.dpo (pairs: data) read"),
        ("[{role: instruction, generate: {rows: 9}}, {role: preference, generate: {rows: 9}}]", "no source gives prompt rows, which align.ppo read"),
    ],
)
def test_a_role_no_source_gives_is_found_when_the_config_is_read(sources, message):
    with pytest.raises(ConfigError, match=r"data.sources: " + message.replace("(", r"\(").replace(")", r"\)")):
        load_config(CONFIGS[0].parent / "demo.yaml", [f"data.sources={sources}", "align.methods=[dpo, ppo]", "align.dpo.pairs=data"])


def model_folder(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in names:
        (folder / name).write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (("tokenizer.json", "model.safetensors"), "no config.json in the model folder"),
        (("config.json", "model.safetensors"), r"no tokenizer in the model folder \(tokenizer.json, tokenizer.model, vocab.json or vocab.txt\)"),
        (("config.json", "tokenizer.json"), r"no weights in the model folder \(\*.safetensors\)"),
        (("config.json", "tokenizer.json", "pytorch_model.bin"), r"weights only as a pickle checkpoint \(pytorch_model.bin\), refused unopened"),
    ],
)
def test_an_incomplete_local_model_folder_is_named_with_what_it_lacks(tmp_path, names, message):
    folder = model_folder(tmp_path, *names)
    cfg = load_config(CONFIGS[0].parent / "demo.yaml", [f"model.name_or_path={folder}"])
    with pytest.raises(ConfigError, match=rf"^demo.yaml: model.name_or_path: {folder}: {message}"):
        cfg.check_outside_paths("demo.yaml")


def test_a_store_root_uri_is_the_shared_store_with_a_local_working_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    cfg = load_config("configs/smoke.yaml", ["store_root=s3://team-bucket/posttrain/"])
    assert cfg.shared_store == "s3://team-bucket/posttrain"
    local = Path(cfg.store_root)
    assert local.parent == tmp_path / "cache" / "stores" and local.name.startswith("s3-team-bucket-posttrain-")
    other = load_config("configs/smoke.yaml", ["store_root=s3://team-bucket/other"])
    assert Path(other.store_root) != local  # each URL its own working copy
    same = load_config("configs/smoke.yaml", ["store_root=s3://team-bucket/posttrain", "shared_store=s3://team-bucket/posttrain"])
    assert same.store_root == cfg.store_root
    with pytest.raises(ConfigError, match="store_root is the URI s3://team-bucket/posttrain and shared_store names another"):
        load_config("configs/smoke.yaml", ["store_root=s3://team-bucket/posttrain", "shared_store=s3://elsewhere/x"])
