from dataclasses import dataclass, field

import pytest

from extractors import EXTRACTORS, create_extractor, default_extractors, list_extractors
from pipelines.cli import ExtractConfig, resolve_extractors, split_extractor_options
from pipelines.config import build_config
from pipelines.errors import ConfigError
from pipelines.registry import DuplicateNameError, Registry


def test_registry_refuses_duplicate_names():
    reg: Registry[object] = Registry("widget")

    @reg.register("a")
    class A:
        pass

    with pytest.raises(DuplicateNameError, match="already registered"):

        @reg.register("a")
        class B:
            pass

    assert reg.get("a") is A
    assert reg.names() == ["a"]


def test_unknown_name_lists_known_ones_and_close_matches():
    with pytest.raises(ConfigError, match=r"audio\.logmel") as info:
        EXTRACTORS.get("audio.logmell")
    assert "Did you mean audio.logmel" in str(info.value)


def test_list_and_default_set():
    assert "audio.logmel" in list_extractors("audio.*")
    assert list_extractors("nothing.*") == []
    assert "audio.logmel" in default_extractors()
    assert all(not n.startswith("test.") for n in default_extractors())


def test_create_extractor_overrides_and_bad_option():
    ex = create_extractor("audio.logmel", n_mels=32)
    assert ex.config.n_mels == 32
    assert ex.config_hash != create_extractor("audio.logmel").config_hash
    assert ex.cache_key("v1").startswith(f"audio.logmel/{ex.version}/{ex.config_hash}/")
    with pytest.raises(ConfigError, match=r"options\.audio\.logmel.*n_melz"):
        create_extractor("audio.logmel", n_melz=32)
    with pytest.raises(ConfigError, match="n_mels"):
        create_extractor("audio.logmel", n_mels="many")


@dataclass
class Cfg:
    name: str = "x"
    count: int = 1
    items: list[str] = field(default_factory=lambda: ["a"])
    maybe: float | None = None


def test_build_config_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: fromfile\ncount: 5\n")
    cfg = build_config(Cfg, path, ["count=7", "items=b,c", "maybe=0.5"])
    assert cfg == Cfg("fromfile", 7, ["b", "c"], 0.5)
    assert build_config(Cfg, None, ["items=[d,e]"]).items == ["d", "e"]


@pytest.mark.parametrize(
    "override, pattern",
    [("cuont=3", "unknown config key.*cuont"), ("count=abc", "count"), ("novalue", "key=value")],
)
def test_build_config_errors_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(Cfg, None, [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        build_config(Cfg, "/nonexistent.yaml")


def test_extractor_options_regrouped_from_dotted_cli_keys():
    cfg = build_config(ExtractConfig, None, ["options.audio.logmel.n_mels=16"])
    assert split_extractor_options(cfg.options, ["audio.logmel"]) == {"audio.logmel": {"n_mels": 16}}
    specs = resolve_extractors(["default"], cfg.options)
    assert [s.config.n_mels for s in specs if s.cls.name == "audio.logmel"] == [16]
    with pytest.raises(ConfigError, match="options.video"):
        split_extractor_options({"video": {"x": 1}}, ["audio.logmel"])


def test_dependencies_are_added():
    names = [s.cls.name for s in resolve_extractors(["test.scaled_mean"], {})]
    assert names == ["test.scaled_mean", "test.frame_stats"]
