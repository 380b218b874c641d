"""Every registered extractor, tested through the same contract (timm-style).

A new extractor is covered here by being registered: its outputs must match
what it declares, be deterministic, and turn bad input into an error that
names the file. Family-specific behaviour gets its own tests below.
"""

import dataclasses

import numpy as np
import pytest

from extractors import create_extractor, get_extractor_class, list_extractors
from extractors.base import Extractor, Result
from pipelines.decode import VideoSource
from pipelines.errors import ConfigError, VideoError
from tests.helpers import tone, write_broken_videos


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return write_broken_videos(tmp_path_factory.mktemp("broken"))


def run(name: str, path, video_id="v", options: dict | None = None) -> Result:
    """Runs ``name`` and, first, whatever it reads, as the orchestrator would.

    ``options`` maps extractor names to their options (small saved models
    for the deep ones); the others run with their defaults.
    """
    video = VideoSource(video_id, str(path))
    results: dict[str, Result] = {}
    options = options or {}

    def resolve(n: str) -> Result:
        if n not in results:
            ex = create_extractor(n, **options.get(n, {}))
            ex.setup()
            inputs = {d: resolve(d) for d in ex.needs().inputs}
            results[n] = ex.process(video, inputs)
        return results[n]

    return resolve(name)


def needs_optional_package(name: str) -> None:
    """Skips extractors whose framework cannot be installed from the registries here."""
    if name == "odf.detectron2":
        pytest.importorskip("detectron2")


@pytest.mark.parametrize("name", list_extractors())
def test_declared_schema(name, broken, deep_options):
    needs_optional_package(name)
    ex: Extractor = create_extractor(name, **deep_options.get(name, {}))
    assert dataclasses.is_dataclass(ex.Config) and ex.version
    result = run(name, broken["good"], options=deep_options)
    if result.flags and not result.arrays:
        # A legitimate absence: the generated clip has no people. Only the pretrained
        # person models may report one here; tests/test_pretrained.py checks their
        # schema on real clips with people in them.
        assert ex.weights == "pretrained", (name, result.flags)
        pytest.skip(f"{name} found nothing in a generated clip ({result.flags}); see test_pretrained.py")
    produced = ex.produces()
    assert set(result.arrays) == set(produced), "outputs must match produces()"
    for key, spec in produced.items():
        array = result.arrays[key]
        assert str(array.dtype) == spec.dtype, key
        assert len(array.shape) == len(spec.shape), key
        for got, want in zip(array.shape, spec.shape, strict=True):
            assert want is None or got == want, (key, array.shape, spec.shape)
        assert np.isfinite(array).all(), key


@pytest.mark.parametrize("name", list_extractors())
def test_deterministic(name, broken, deep_options):
    needs_optional_package(name)
    first = run(name, broken["good"], options=deep_options)
    second = run(name, broken["good"], options=deep_options)
    for key in first.arrays:
        np.testing.assert_array_equal(first.arrays[key], second.arrays[key])


@pytest.mark.parametrize("name", list_extractors())
@pytest.mark.parametrize("kind", ["corrupt", "zero_byte"])
def test_bad_input_names_the_file(name, kind, broken, deep_options):
    needs_optional_package(name)
    needs = create_extractor(name, **deep_options.get(name, {})).needs()
    if needs.frames is None and needs.audio is None and not needs.inputs:
        pytest.skip("reads no media")
    with pytest.raises(VideoError) as info:
        run(name, broken[kind], options=deep_options)
    assert str(broken[kind]) in str(info.value)


@pytest.mark.parametrize("name", list_extractors())
def test_says_what_it_runs(name):
    """`hallucinate extractors` and the README tell pretrained models from heuristics and checkpoints."""
    from extractors.base import WEIGHTS_KINDS

    cls = get_extractor_class(name)
    assert cls.weights in WEIGHTS_KINDS, cls.weights
    if cls.in_default_set:  # the default set runs on a fresh machine, with no download
        assert cls.weights in ("pretrained", "heuristic"), name


@pytest.mark.parametrize("name", list_extractors())
def test_config_hash_tracks_config_and_version(name, deep_options):
    cls = get_extractor_class(name)
    ex = create_extractor(name, **deep_options.get(name, {}))
    assert ex.config_hash == create_extractor(name, **deep_options.get(name, {})).config_hash
    fields = [f for f in dataclasses.fields(cls.Config) if f.type in ("int", "float", int, float)]
    changed = []
    for f in fields:  # the first numeric option that still makes a valid config
        try:
            changed.append(cls(dataclasses.replace(ex.config, **{f.name: getattr(ex.config, f.name) + 1})))
            break
        except ConfigError:
            continue
    assert bool(changed) == bool(fields), "no numeric option could be changed"
    for other in changed:
        assert other.config_hash != ex.config_hash


# ---------------------------------------------------------------- audio.logmel


def test_audio_tones_differ_in_the_expected_mel_bands(tmp_path):
    from pipelines.encode import write_video
    from tests.helpers import moving_frames

    low, high = tmp_path / "low.mp4", tmp_path / "high.mp4"
    write_video(low, moving_frames(24), 12, tone(2, 300))
    write_video(high, moving_frames(24), 12, tone(2, 3000))
    n_mels = get_extractor_class("audio.logmel")().config.n_mels
    mean_low = run("audio.logmel", low).arrays["stats"][:n_mels]
    mean_high = run("audio.logmel", high).arrays["stats"][:n_mels]
    import librosa

    centres = librosa.mel_frequencies(n_mels + 2, fmax=8000)[1:-1]
    assert abs(centres[mean_low.argmax()] - 300) < 120
    assert abs(centres[mean_high.argmax()] - 3000) < 400
    assert mean_low[: n_mels // 4].mean() > mean_high[: n_mels // 4].mean()


def test_audio_missing_and_silent_are_flagged_not_zero(broken):
    for kind, reason in (("no_audio", "no audio stream"), ("silent", "silent")):
        result = run("audio.logmel", broken[kind])
        assert result.arrays == {}
        assert reason in result.flags["no_audio"]


def test_audio_of_a_video_less_file_still_works(broken):
    assert run("audio.logmel", broken["video_less"]).arrays["stats"].shape == (372,)


@pytest.mark.filterwarnings("ignore:n_fft=512 is too large")  # librosa's, on the short case
def test_mel_power_log_and_mfcc_match_librosa():
    import librosa

    from extractors.audio import log_mel_mfcc, mel_power

    y = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    for n in (16000, 1000, 150):  # long, short, shorter than one window
        ours = mel_power(y[:n], 16000, n_fft=512, win=400, hop=160, n_mels=64)
        ref = librosa.feature.melspectrogram(
            y=y[:n], sr=16000, n_fft=512, win_length=400, hop_length=160, n_mels=64, pad_mode="constant"
        )
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6 * ref.max())
    logmel, mfcc = log_mel_mfcc(ref, 20)
    ref_db = librosa.power_to_db(ref, ref=1.0, amin=1e-10, top_db=None)
    np.testing.assert_allclose(logmel, ref_db, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(mfcc, librosa.feature.mfcc(S=ref_db, n_mfcc=20), rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------- audio.soundnet


def test_soundnet_loads_the_port_layout_and_averages_pool5(broken, tmp_path):
    import torch

    from extractors.audio import build_soundnet8
    from pipelines.errors import MissingWeightsError
    from tests.helpers import save_soundnet

    path = save_soundnet(tmp_path / "sound8.pth")
    state = torch.load(path, weights_only=True)
    for key in ("conv1.weight", "batchnorm1.running_var", "conv5.bias", "conv8.weight", "conv8_2.bias"):
        assert key in state
    assert state["conv8_2.weight"].shape == (401, 1024, 8, 1)
    ex = create_extractor("audio.soundnet", weights=str(path), device="cpu")
    ex.setup()
    result = ex.process(VideoSource("v", str(broken["good"])), {})
    samples = VideoSource("v", str(broken["good"])).audio(ex.needs().audio).samples
    net = build_soundnet8().eval()
    net.load_state_dict(state)
    with torch.no_grad():
        want = net.pool5(torch.from_numpy(samples * 256).view(1, 1, -1, 1))[0, :, :, 0].mean(1).numpy()
    np.testing.assert_allclose(result.arrays["descriptor"], want, rtol=1e-4, atol=1e-5)
    assert result.attrs["pool5_steps"] > 5  # 4 s at 22.05 kHz
    for kind in ("silent", "no_audio"):
        flagged = ex.process(VideoSource(kind, str(broken[kind])), {})
        assert "no_audio" in flagged.flags and not flagged.arrays
    with pytest.raises(MissingWeightsError, match="sound8.pth"):
        create_extractor("audio.soundnet").setup()
