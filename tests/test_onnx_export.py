"""ONNX export: the padded, masked ONNX graphs run by onnxruntime agree with TensorFlow's inner
loop on unpadded episodes, real Omniglot and synthetic; every graph is plain, checked and
reproducible."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf

from mmtl_tf.config import preset
from mmtl_tf.data.class_images import ClassImages
from mmtl_tf.data.episodes import EpisodeSampler, episode_dataset
from mmtl_tf.export import onnx_convert
from mmtl_tf.export.signatures import Exportable, ExportSpec
from mmtl_tf.meta import inner_loop as il
from mmtl_tf.preprocessing import Preprocessing
from mmtl_tf.training import build_learner

MAX_WAYS, MAX_SHOTS, QUERIES = 8, 3, 3
EPISODES = ((5, 1), (3, 2), (7, 3))  # (ways, shots), all within the 8-way 3-shot export
STEPS = 3
TOLERANCE = 1e-4  # absolute, on query logits after adaptation
LEVELS = {"disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
# Learners covering both batch-norm modes, the three head initialisations and Meta-SGD's
# per-element learning rates: (transductive, head_init, learned_inner_lr). "support_stats" is
# the shipped exported/omniglot's batch-norm mode; "proto" is its whole kind.
KINDS = {"transductive": (True, "learned", "none"),
         "support_stats": (False, "zero", "none"),
         "metasgd": (True, "zero", "per_element"),
         "proto": (False, "proto", "none")}
# What an export of each kind holds: every kind has predict, adapt_step, head_step, init_head
# and meta_init; support-statistics batch norm adds support_stats, and a zero head (whose first
# step moves only the head) adds head_then_adapt_step.
EXPECTED_GRAPHS = {
    "transductive": {"predict", "adapt_step", "head_step", "init_head", "meta_init"},
    "support_stats": {"predict", "support_stats", "adapt_step", "head_step", "init_head",
                      "head_then_adapt_step", "meta_init"},
    "metasgd": {"predict", "adapt_step", "head_step", "init_head", "head_then_adapt_step",
                "meta_init"},
    "proto": {"predict", "support_stats", "adapt_step", "head_step", "init_head", "meta_init"}}
# The graphs these tests convert (conversion is the slow part): what they use.
GRAPHS = {"transductive": ["predict", "adapt_step", "head_step", "init_head", "meta_init"],
          "support_stats": ["predict", "support_stats", "adapt_step", "head_step", "init_head",
                            "head_then_adapt_step", "meta_init"],
          "metasgd": ["predict", "adapt_step", "head_step", "init_head", "head_then_adapt_step"],
          "proto": ["predict", "support_stats", "adapt_step", "init_head"]}


def _exportable(transductive, head_init, learned_lr, downsample="stride"):
    config = preset("tiny").replace(
        meta={"max_ways": MAX_WAYS, "transductive": transductive, "head_init": head_init,
              "learned_inner_lr": learned_lr},
        model={"downsample": downsample})
    learner = build_learner(config)
    if learned_lr == "per_element":  # rates that differ per element, so a mixed-up input shows
        rng = np.random.default_rng(7)
        for lr in learner.inner_lrs:  # unequal head columns too: a zero head has no column
            lr.assign(rng.uniform(0.2, 0.6, lr.shape).astype(np.float32))  # order, TF shares
        # their mean, and the export must ship that one rule (Exportable.initial_lrs)
    spec = ExportSpec(28, 1, MAX_WAYS, MAX_SHOTS, transductive, learned_lr)
    return Exportable(learner, spec)


def _drawn(classes):
    """One episode of each EPISODES shape from ``classes``, as numpy, by (ways, shots)."""
    drawn = {}
    for seed, (ways, shots) in enumerate(EPISODES):
        sampler = EpisodeSampler(classes, ways, shots, QUERIES)
        episode = next(iter(episode_dataset(sampler, seed, num_episodes=1)))
        drawn[ways, shots] = tf.nest.map_structure(lambda t: t.numpy(), episode)
    return drawn


@pytest.fixture(scope="module")
def omniglot_episodes(omniglot_zips):
    """Real Omniglot episodes (small2 split)."""
    from mmtl_tf.data.omniglot import load_omniglot_classes

    return _drawn(load_omniglot_classes("small2", Preprocessing(28)))


@pytest.fixture(scope="module")
def episodes():
    """Synthetic episodes, no data needed: 12 classes, each a random 28x28 stroke pattern of
    ink (1) on paper (0) like preprocessed Omniglot, its 6 images the pattern with 10% of the
    pixels flipped."""
    rng = np.random.default_rng(13)
    patterns = np.kron(rng.random((12, 7, 7)) < 0.3, np.ones((4, 4), bool))  # (12, 28, 28)
    images = np.repeat(patterns, 6, axis=0) ^ (rng.random((72, 28, 28)) < 0.1)
    return _drawn(ClassImages.from_labels(images[..., None].astype(np.float32),
                                          np.repeat(np.arange(12) + 40, 6)))


@pytest.fixture(scope="module")
def models():
    """kind -> (Exportable, {graph name: ModelProto}); each graph converted once per module."""
    built = {}
    for kind, args in KINDS.items():
        exportable = _exportable(*args)
        built[kind] = exportable, onnx_convert.export_graphs(exportable, GRAPHS[kind])
    return built


class Runner:
    """onnxruntime sessions of one model's graphs at one optimisation level, fed by name."""

    def __init__(self, graphs, level):
        options = ort.SessionOptions()
        options.graph_optimization_level = LEVELS[level]
        self.sessions = {name: ort.InferenceSession(m.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"])
                         for name, m in graphs.items()}

    def __call__(self, graph, **feeds):
        session = self.sessions[graph]
        wanted = {i.name for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def _padded(support_x, support_y, rng):
    """The support set padded to max_support rows with junk images and labels, masked out."""
    rows, ways, total = len(support_y), len(np.unique(support_y)), MAX_WAYS * MAX_SHOTS
    images = rng.uniform(size=(total, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, MAX_WAYS, total).astype(np.int32)
    images[:rows], labels[:rows] = support_x, support_y
    return {"support_images": images, "support_labels": labels,
            "sample_mask": (np.arange(total) < rows).astype(np.float32),
            "class_mask": (np.arange(MAX_WAYS) < ways).astype(np.float32)}


def _onnx_adapt(run, ex, support, steps):
    """What a device does: init_head, then ``steps`` chained adapt_step runs. Yields the
    params after each step."""
    params = {n: p.numpy() for n, p in zip(ex.names, ex.params)}
    head = run("init_head", **support, **params)
    params["head_w"], params["head_b"] = head["new_head_w"], head["new_head_b"]
    for step in range(steps):
        lrs = {"lr_" + n: np.asarray(lr) for n, lr in zip(ex.names, ex.initial_lrs(step))}
        out = run("adapt_step", **support, **params, **lrs)
        params = {n: out["new_" + n] for n in ex.names}
        yield params


def _onnx_query_logits(run, ex, support, params, query_x):
    feeds = {"images": query_x, **params}
    if not ex.spec.transductive:
        feeds.update(run("support_stats", **support, **params))
    return run("predict", **feeds)["logits"]


def _tf_query_logits(ex, episode, ways, steps):
    """The reference: TF's inner loop on the unpadded support set with an N-way head.

    Batch norm takes the element-wise path, the arithmetic of the padded graphs: these untrained
    learners' support losses rise step after step, which amplifies the ~1e-6 rounding difference
    of the fused kernel (compared with the element-wise path in test_inner_loop) to ~1e-2."""
    for norm in getattr(ex.loop.encoder, "norms", []):
        norm.fused = False
    adapted = il.adapt(ex.loop, ex.params, tf.constant(episode.support_x),
                       tf.constant(episode.support_y), ways, steps,
                       ex.learner.learning_rates(ways), True).params
    return il.query_logits(ex.loop, adapted, tf.constant(episode.support_x),
                           tf.constant(episode.query_x)).numpy()


@pytest.mark.parametrize("source", ["omniglot", "synthetic"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", KINDS)
def test_padded_onnx_adaptation_matches_tensorflow_on_unpadded_episodes(models, request, kind,
                                                                        level, source):
    episodes = request.getfixturevalue("omniglot_episodes" if source == "omniglot" else "episodes")
    ex, graphs = models[kind]
    run = Runner(graphs, level)
    rng = np.random.default_rng(5)
    for (ways, shots), episode in episodes.items():
        support = _padded(episode.support_x, episode.support_y, rng)
        for step, params in enumerate(_onnx_adapt(run, ex, support, STEPS), start=1):
            if step not in (1, STEPS):
                continue
            got = _onnx_query_logits(run, ex, support, params, episode.query_x)[:, :ways]
            want = _tf_query_logits(ex, episode, ways, step)
            # Proto-MAML logits are squared distances (here up to ~30): TensorFlow's own float32
            # rounding moves them by ~3e-4 (padded vs unpadded TF), so 1e-4 is relative there.
            scale = np.abs(want).max() if kind == "proto" else 1.0
            np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * scale,
                                       err_msg=f"{kind} {source} {ways}-way {shots}-shot after {step} steps")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", ["transductive", "support_stats"])
def test_predict_accepts_any_batch_size(models, kind, level):
    ex, graphs = models[kind]
    run = Runner({"predict": graphs["predict"]}, level)
    params = {n: p.numpy() for n, p in zip(ex.names, ex.params)}
    stats = None if ex.spec.transductive else ex.bn_state
    feeds = dict(params) if stats is None else {**params, **{n: v.numpy() for n, v in zip(ex.bn, stats)}}
    rng = np.random.default_rng(11)
    for batch in (3, 11):
        images = rng.uniform(size=(batch, 28, 28, 1)).astype(np.float32)
        got = run("predict", images=images, **feeds)["logits"]
        want = ex.predict(tf.constant(images), ex.params, stats).numpy()
        assert got.shape == (batch, MAX_WAYS)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_head_step_matches_tensorflow(models, episodes):
    ex, graphs = models["transductive"]
    support = _padded(episodes[5, 1].support_x, episodes[5, 1].support_y, np.random.default_rng(2))
    params = {n: p.numpy() for n, p in zip(ex.names, ex.params)}
    lrs = {"lr_" + n: np.asarray(lr) for n, lr in zip(ex.names, ex.initial_lrs())}
    got = Runner({"head_step": graphs["head_step"]}, "enable_all")("head_step", **support, **params, **lrs)
    loss, (head_w, head_b) = ex.head_step(*(tf.constant(support[k]) for k in support),
                                          ex.params, ex.initial_lrs())
    for name, want in (("loss", loss), ("new_head_w", head_w), ("new_head_b", head_b)):
        np.testing.assert_allclose(got[name], want.numpy(), rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("kind", ["support_stats", "metasgd"])
def test_head_then_adapt_step_is_the_two_steps_on_one_forward_pass(models, episodes, kind):
    ex, graphs = models[kind]
    run = Runner(graphs, "disable_all")
    episode = episodes[5, 1]
    support = _padded(episode.support_x, episode.support_y, np.random.default_rng(6))
    params = {n: p.numpy() for n, p in zip(ex.names, ex.params)}
    params["head_w"], params["head_b"] = np.zeros_like(params["head_w"]), np.zeros_like(params["head_b"])
    rates = {"lr_" + n: np.asarray(lr) for n, lr in zip(ex.names, ex.initial_lrs())}
    later = {k: np.asarray(0.5 * v, np.float32) for k, v in rates.items()}  # mixed-up inputs show
    fused = run("head_then_adapt_step", **support, **params, **rates,
                **{"next_" + k: v for k, v in later.items()})
    first = run("head_step", **support, **params, **rates)
    middle = {**params, "head_w": first["new_head_w"], "head_b": first["new_head_b"]}
    second = run("adapt_step", **support, **middle, **later)
    pairs = [("loss", first["loss"]), ("head_w_1", first["new_head_w"]),
             ("head_b_1", first["new_head_b"]), ("next_loss", second["loss"])]
    pairs += [("new_" + n, second["new_" + n]) for n in ex.names]
    for name, want in pairs:
        np.testing.assert_allclose(fused[name], want, rtol=0, atol=1e-6, err_msg=name)
    assert np.abs(second["new_head_w"] - middle["head_w"]).max() > 1e-4  # the second step moved
    # The encoder forward pass (most of head_step) is converted once, not twice.
    sizes = {g: len(graphs[g].graph.node) for g in ("head_then_adapt_step", "head_step", "adapt_step")}
    assert sizes["head_then_adapt_step"] < sizes["adapt_step"] + sizes["head_step"] // 2, sizes


@pytest.mark.parametrize("kind", ["transductive", "support_stats"])
def test_personalized_model_equals_predict_fed_the_adapted_params(models, episodes, kind):
    ex, graphs = models[kind]
    run = Runner(graphs, "enable_all")
    episode = episodes[3, 2]
    support = _padded(episode.support_x, episode.support_y, np.random.default_rng(3))
    params = list(_onnx_adapt(run, ex, support, 2))[-1]
    stats = None if ex.spec.transductive else run("support_stats", **support, **params)
    model = onnx_convert.personalized(ex, [params[n] for n in ex.names],
                                      None if stats is None else [stats[n] for n in ex.bn])
    assert [i.name for i in model.graph.input] == ["images"]
    got = Runner({"p": model}, "enable_all")("p", images=episode.query_x)["logits"]
    want = run("predict", images=episode.query_x, **params, **(stats or {}))["logits"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_support_logits_are_predict_on_the_support_set_with_its_statistics(models, episodes):
    """The device takes its final support loss from support_stats' logits instead of a second
    pass through predict: the real rows must be predict's logits under the returned statistics."""
    ex, graphs = models["support_stats"]
    run = Runner(graphs, "enable_all")
    episode = episodes[3, 2]
    support = _padded(episode.support_x, episode.support_y, np.random.default_rng(4))
    params = list(_onnx_adapt(run, ex, support, 2))[-1]
    out = run("support_stats", **support, **params)
    rows = len(episode.support_y)
    assert out["support_logits"].shape == (MAX_WAYS * MAX_SHOTS, MAX_WAYS)
    want = run("predict", images=episode.support_x, **params, **out)["logits"]
    np.testing.assert_allclose(out["support_logits"][:rows], want, rtol=0, atol=1e-5)
    assert np.abs(want).max() > 1e-2  # a zero head would make any two logits equal


@pytest.mark.parametrize("kind", ["transductive", "support_stats"])
def test_meta_init_is_the_keras_model_in_inference_mode(models, kind):
    """As serving_default: the calibrated statistics, in both batch-norm modes (a batch of 6
    random images has statistics far from the stored ones, so batch statistics would show)."""
    ex, graphs = models[kind]
    images = np.random.default_rng(4).uniform(size=(6, 28, 28, 1)).astype(np.float32)
    got = Runner({"m": graphs["meta_init"]}, "disable_all")("m", images=images)["logits"]
    want = ex.learner(tf.constant(images), training=False).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    batch_stats = ex.predict(tf.constant(images), ex.params, None).numpy()
    assert np.abs(batch_stats - want).max() > 1e-2


def test_every_graph_is_plain_checked_onnx_with_the_exact_interface(models):
    for kind, (ex, graphs) in models.items():
        names = onnx_convert.graph_names(ex)  # what export() writes for this kind
        assert len(names) == len(set(names)) and set(names) == EXPECTED_GRAPHS[kind], kind
        for name, model in graphs.items():
            assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, (kind, name)
            onnx.checker.check_model(model, full_check=True)
            assert model.graph.name == name
        inputs = lambda g: [i.name for i in graphs[g].graph.input]  # noqa: E731
        outputs = lambda g: [o.name for o in graphs[g].graph.output]  # noqa: E731
        lrs = ["lr_" + n for n in ex.names]
        support = ["support_images", "support_labels", "sample_mask"]
        stats = [] if ex.spec.transductive else ex.bn
        assert inputs("predict") == ["images", *ex.names, *stats]
        assert outputs("predict") == ["logits"]
        assert inputs("adapt_step") == [*support, "class_mask", *ex.names, *lrs]
        assert outputs("adapt_step") == ["loss"] + ["new_" + n for n in ex.names]
        assert inputs("init_head") == [*support, *ex.names]
        assert outputs("init_head") == ["new_head_w", "new_head_b"]
        if stats:
            assert outputs("support_stats") == [*ex.bn, "support_logits"]


def test_conversion_is_deterministic(models):
    ex, graphs = models["support_stats"]
    again = onnx_convert.export_graphs(ex, ["adapt_step", "support_stats"])
    for name, model in again.items():
        assert model.SerializeToString() == graphs[name].SerializeToString(), name


def test_an_unsupported_op_raises_naming_it():
    def broadcast_args(x):  # appears in gradients with a dynamic batch; deliberately unconverted
        return list(tf.raw_ops.BroadcastGradientArgs(s0=tf.shape(x), s1=tf.constant([1, 3])))

    with pytest.raises(onnx_convert.OnnxExportError, match="BroadcastGradientArgs") as raised:
        onnx_convert.to_onnx(broadcast_args, [tf.TensorSpec([None, 3], tf.float32, "x")], ["a", "b"])
    assert raised.value.ops == ("BroadcastGradientArgs",)


def test_a_dynamic_support_size_is_refused():
    def kernel_gradient(x):
        kernel = tf.ones([3, 3, 1, 2])
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME"))
        return tape.gradient(loss, kernel)

    with pytest.raises(onnx_convert.OnnxExportError, match="needs static sizes") as raised:
        onnx_convert.to_onnx(kernel_gradient, [tf.TensorSpec([2, None, None, 1], tf.float32, "x")], ["g"])
    assert raised.value.ops == ("Conv2DBackpropFilter",)


@pytest.mark.parametrize("side, stride, padding, kernel", [
    (14, 2, "SAME", 3),   # Conv4's second block: too big for the scatter matrix
    (15, 2, "SAME", 3),   # odd side: the interleaved phases are cropped
    (17, 3, "VALID", 3),  # three phases per axis, no padding
    (16, 2, "SAME", 4)])  # an even kernel: phases get different numbers of taps
def test_strided_input_gradient_is_converted_by_phases_and_matches_tensorflow(side, stride, padding,
                                                                             kernel):
    rng = np.random.default_rng(side)
    x = rng.normal(size=(3, side, side, 5)).astype(np.float32)
    w = rng.normal(size=(kernel, kernel, 5, 6)).astype(np.float32)

    def input_gradient(x, w):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.conv2d(x, w, stride, padding)
            loss = tf.reduce_sum(y * tf.cos(y))  # an output gradient that varies everywhere
        return tape.gradient(loss, x)

    model = onnx_convert.to_onnx(input_gradient, [tf.TensorSpec(x.shape, tf.float32, "x"),
                                                  tf.TensorSpec(w.shape, tf.float32, "w")], ["dx"])
    ops = {n.op_type for n in model.graph.node}
    assert "ConvTranspose" not in ops and "Gemm" in ops
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["dx"], {"x": x, "w": w})[0]
    want = input_gradient(tf.constant(x), tf.constant(w)).numpy()  # entries up to ~140
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_write_onnx_replaces_the_file_atomically(models, tmp_path):
    model = models["transductive"][1]["predict"]
    path = tmp_path / "predict.onnx"
    path.write_bytes(b"old")
    assert onnx_convert.write_onnx(model, path) == path
    assert path.read_bytes() == model.SerializeToString()
    assert [p.name for p in tmp_path.iterdir()] == ["predict.onnx"]


@pytest.mark.slow
def test_maxpool_encoder_adapt_step_matches_tensorflow():
    """MaxPoolGrad's converter. On continuous random images: on Omniglot's binary strokes many
    pooling windows hold values within float32 rounding of each other, and TF and onnxruntime
    may then route the gradient to different (equally valid) maxima."""
    ex = _exportable(True, "learned", "none", downsample="maxpool")
    graphs = onnx_convert.export_graphs(ex, ["adapt_step"])
    assert "ScatterElements" in {n.op_type for n in graphs["adapt_step"].graph.node}
    rng = np.random.default_rng(9)
    labels = np.repeat(np.arange(7), 3).astype(np.int32)
    support = _padded(rng.uniform(size=(21, 28, 28, 1)).astype(np.float32), rng.permutation(labels), rng)
    params = {n: p.numpy() for n, p in zip(ex.names, ex.params)}
    lrs = {"lr_" + n: np.asarray(lr) for n, lr in zip(ex.names, ex.initial_lrs())}
    got = Runner(graphs, "enable_all")("adapt_step", **support, **params, **lrs)
    loss, new = ex.adapt_step(*(tf.constant(support[k]) for k in support), ex.params, ex.initial_lrs())
    np.testing.assert_allclose(got["loss"], loss.numpy(), rtol=0, atol=1e-5)
    for name, want in zip(ex.names, new):
        np.testing.assert_allclose(got["new_" + name], want.numpy(), rtol=0, atol=1e-5, err_msg=name)
