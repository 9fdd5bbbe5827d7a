"""FSP, AB, FT and KDSVD against computations written from the papers' equations, and the initialization
phase (kdrun.engine.init_phase) that AB, FSP and FT train first.

The references use explicit loops over samples, channels and positions and elementary tensor ops, never the
helpers of kdrun.distill.feature_*.
"""
import copy
import itertools
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kdrun.config.schema import register_configs
from kdrun.data import build_dataset
from kdrun.distill import TERM_TYPES, FeatureShapes, StepContext, build_loss
from kdrun.distill.feature_ab import ABTerm
from kdrun.distill.feature_fsp import FSPTerm
from kdrun.distill.feature_ft import FTTerm
from kdrun.distill.feature_svd import KDSVDTerm
from kdrun.engine.forward import FeaturePairing, StepForward
from kdrun.engine.init_phase import run_init_phase
from kdrun.engine.trainer import Recipe, Stage, prepare_training, train
from kdrun.errors import KdrunError
from kdrun.models import create_model
from kdrun.models.features import build_feature_taps, match_stages
from kdrun.paths import conf_dir

register_configs()


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def shapes_of(student, teacher) -> FeatureShapes:
    return FeatureShapes([m.shape[1] for m in student], [m.shape[1] for m in teacher],
                         [tuple(m.shape[2:]) for m in student], [tuple(m.shape[2:]) for m in teacher])


def random_maps(channels, sizes, batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, h, generator=generator, dtype=torch.float64) for c, h in zip(channels, sizes)]


def context(student, teacher) -> StepContext:
    batch = student[0].shape[0]
    return StepContext(torch.zeros(batch, 10), torch.zeros(batch, dtype=torch.long), torch.arange(batch),
                       torch.zeros(batch, 10), 0, student_features=student, teacher_features=teacher)


def block_mean(x, size):
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


# --- FSP (Yim et al., CVPR 2017, Eq. (1)-(2)) -----------------------------------------------------------

def fsp_by_hand(first, second):
    """G[b][i][j] = sum_{h,w} F1[b,i,h,w] F2[b,j,h,w] / (h w), the larger map block-averaged to the smaller."""
    size = min(first.shape[2], second.shape[2])
    first, second = block_mean(first, size), block_mean(second, size)
    return [[[sum(first[b, i, h, w].item() * second[b, j, h, w].item()
                  for h, w in itertools.product(range(size), range(size))) / size ** 2
              for j in range(second.shape[1])] for i in range(first.shape[1])] for b in range(first.shape[0])]


def fsp_loss_by_hand(student, teacher):
    total = 0.0
    for k in range(len(student) - 1):
        g_s, g_t = fsp_by_hand(student[k], student[k + 1]), fsp_by_hand(teacher[k], teacher[k + 1])
        squares = [(a - b) ** 2 for rs, rt in zip(g_s, g_t) for xs, xt in zip(rs, rt) for a, b in zip(xs, xt)]
        total += sum(squares) / len(squares)   # mean over (batch, C1, C2), summed over consecutive pairs
    return total


def test_fsp_matches_the_papers_matrices():
    student, teacher = random_maps([3, 4, 5], [4, 4, 2]), random_maps([3, 4, 5], [4, 4, 2], seed=1)
    term = FSPTerm(shapes_of(student, teacher), joint=True)
    expected = fsp_loss_by_hand(student, teacher)
    assert term(context(student, teacher)).item() == pytest.approx(expected, rel=1e-12)
    assert term.init_loss(context(student, teacher)).item() == pytest.approx(expected, rel=1e-12)
    assert term(context(teacher, teacher)).item() == pytest.approx(0.0, abs=1e-15)
    assert all(isinstance(a, torch.nn.Identity) for a in term.adapters)   # equal widths: nothing learnable


def test_fsp_outside_joint_reads_zero_and_adapts_other_widths():
    student, teacher = random_maps([2, 4], [4, 2]), random_maps([3, 4], [4, 2])
    term = FSPTerm(shapes_of(student, teacher))
    assert term(context(student, teacher)).item() == 0.0 and term.init_loss(context(student, teacher)) > 0
    assert isinstance(term.adapters[0], torch.nn.Sequential) and isinstance(term.adapters[1], torch.nn.Identity)


# --- AB (Heo et al., AAAI 2019, Eq. (6)) ------------------------------------------------------------------

def ab_by_hand(student, teacher, margin):
    n, total = len(student), 0.0
    for i, (s, t) in enumerate(zip(student, teacher)):
        stage = 0.0
        for s_x, t_x in zip(s.flatten().tolist(), t.flatten().tolist()):
            if t_x > 0:      # an active teacher neuron: the student's response must reach +margin
                stage += max(margin - s_x, 0.0) ** 2
            else:            # an inactive one: the response must stay below -margin
                stage += max(margin + s_x, 0.0) ** 2
        total += 2.0 ** (i - n + 1) * stage / s.shape[0] * 3 / 1000
    return total


def test_ab_matches_the_papers_hinge_with_the_reference_scaling():
    student, teacher = random_maps([4, 6], [4, 2]), random_maps([4, 6], [4, 2], seed=1)
    term = ABTerm(shapes_of(student, teacher), margin=0.5, connector="auto", joint=True)
    assert all(isinstance(c, torch.nn.Identity) for c in term.connectors)
    expected = ab_by_hand(student, teacher, 0.5)
    assert term(context(student, teacher)).item() == pytest.approx(expected, rel=1e-12)
    # a student beyond the margin on the teacher's side of every boundary has nothing left to learn
    separated = [torch.where(t > 0, 0.6, -0.6) for t in teacher]
    assert term(context(separated, teacher)).item() == 0.0


def test_ab_connectors_and_bad_settings():
    student, teacher = random_maps([4, 6], [4, 2]), random_maps([4, 6], [4, 2], seed=1)
    term = ABTerm(shapes_of(student, teacher))   # default: a conv + BN connector on every stage, no ReLU
    assert all(isinstance(c[-1], torch.nn.BatchNorm2d) for c in term.connectors)
    assert term(context(student, teacher)).item() == 0.0   # joint: false, the loss lives in the init phase
    with pytest.raises(KdrunError, match="connector='identity' is not one of always, auto"):
        ABTerm(shapes_of(student, teacher), connector="identity")
    with pytest.raises(KdrunError, match="init_epochs=0 and joint=false never applies its loss"):
        ABTerm(shapes_of(student, teacher), init_epochs=0)


# --- FT (Kim et al., NeurIPS 2018, Eq. (1)-(3)) -----------------------------------------------------------

def factor_by_hand(f, p1):
    b, c, h, w = f.shape
    rows = []
    for n in range(b):
        values = [sum(f[n, ch, y, x].item() ** p1 for ch in range(c)) / c for y in range(h) for x in range(w)]
        norm = math.sqrt(sum(v * v for v in values))
        rows.append([v / norm for v in values])
    return rows


def test_ft_compares_normalized_factors_and_keeps_the_paraphraser_frozen():
    student, teacher = random_maps([3], [4]), [m.relu() for m in random_maps([6], [2], seed=1)]
    student[0].requires_grad_(True)
    term = FTTerm(shapes_of(student, teacher))
    assert term.paraphraser.encoder[-2].out_channels == 3 and term.translator[-3].out_channels == 3   # int(0.5 * 6)
    value = term(context(student, teacher))
    with torch.no_grad():
        f_s = block_mean(term.translator(student[0]), 2)   # the larger (student) factor pooled to 2x2
        f_t = term.paraphraser.encoder(teacher[0])
    diffs = [abs(a - b) for rs, rt in zip(factor_by_hand(f_s, 2), factor_by_hand(f_t, 2)) for a, b in zip(rs, rt)]
    assert value.item() == pytest.approx(sum(diffs) / len(diffs), rel=1e-12)
    value.backward()
    assert all(p.grad is None for p in term.paraphraser.parameters())
    assert all(p.grad is not None for p in term.translator.parameters()) and student[0].grad is not None


def test_ft_init_loss_is_the_paraphrasers_reconstruction_error():
    student, teacher = random_maps([3], [4]), [m.relu() for m in random_maps([6], [2], seed=1)]
    term = FTTerm(shapes_of(student, teacher))
    with torch.no_grad():
        rebuilt = term.paraphraser.decoder(term.paraphraser.encoder(teacher[0]))
    expected = sum((a - b) ** 2 for a, b in zip(rebuilt.flatten().tolist(), teacher[0].flatten().tolist()))
    loss = term.init_loss(context(student, teacher))
    assert loss.item() == pytest.approx(expected / teacher[0].numel(), rel=1e-12)
    loss.backward()
    assert all(p.grad is not None for p in term.paraphraser.parameters())
    assert all(p.grad is None for p in term.translator.parameters())
    with pytest.raises(KdrunError, match="ft.layer=2 is out of range"):
        FTTerm(shapes_of(student, teacher), layer=2)


def test_ft_authors_form_compares_the_papers_flattened_factors():
    student, teacher = random_maps([3], [2]), [m.relu() for m in random_maps([6], [2], seed=1)]
    term = FTTerm(shapes_of(student, teacher), form="authors")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in term.translator)
    with torch.no_grad():
        f_s, f_t = term.translator(student[0]), term.paraphraser.encoder(teacher[0])
    diffs = []
    for a, b in zip(f_s.flatten(1).tolist(), f_t.flatten(1).tolist()):   # ||F_S/||F_S|| - F_T/||F_T|| || per sample
        norm_a, norm_b = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        diffs += [abs(x / norm_a - y / norm_b) for x, y in zip(a, b)]
    assert term(context(student, teacher)).item() == pytest.approx(sum(diffs) / len(diffs), rel=1e-12)
    with pytest.raises(KdrunError, match="ft.form='paper' is not one of repdistiller, authors"):
        FTTerm(shapes_of(student, teacher), form="paper")


# --- KDSVD (Lee et al., ECCV 2018) ------------------------------------------------------------------------

def kdsvd_by_hand(student, teacher, k=1):
    """Per sample: right singular vectors of the (HW x C) map, normalized singular values of the teacher,
    the student's k + 3 vectors aligned to the teacher's, RBF between consecutive maps, summed squares / B."""
    batch, total = student[0].shape[0], 0.0
    for n in range(batch):
        previous = None
        for s_map, t_map in zip(student, teacher):
            vectors = []
            for f, keep in ((t_map[n], k), (s_map[n], k + 3)):
                _, sv, vh = torch.linalg.svd(f.reshape(f.shape[0], -1).T, full_matrices=False)
                vectors.append(([x / sv[:k].norm().item() for x in sv[:k].tolist()], vh[:keep].tolist()))
            (s_t, v_t), (_, v_s) = vectors
            aligned = []
            for j in range(k):   # the student vector of largest |cosine| with teacher vector j, sign-matched
                cos = [sum(a * b for a, b in zip(v, v_t[j])) for v in v_s]
                best = max(range(len(cos)), key=lambda i: abs(cos[i]))
                aligned.append([math.copysign(1.0, cos[best]) * x for x in v_s[best]])
            v_t = [[x * s_t[j] for x in v_t[j]] for j in range(k)]
            v_s = [[x * s_t[j] for x in aligned[j]] for j in range(k)]
            if previous is not None:
                p_s, p_t = previous
                for j in range(k):
                    for a, b in itertools.product(range(len(v_s[j])), range(len(p_s[j]))):
                        g_s = math.exp(-(v_s[j][a] - p_s[j][b]) ** 2 / 8)
                        g_t = math.exp(-(v_t[j][a] - p_t[j][b]) ** 2 / 8)
                        total += (g_s - g_t) ** 2
            previous = (v_s, v_t)
    return total / batch


def test_kdsvd_matches_the_papers_rbf_of_singular_vectors():
    student, teacher = random_maps([4, 5, 6], [4, 4, 2]), random_maps([4, 5, 6], [4, 4, 2], seed=1)
    term = KDSVDTerm(shapes_of(student, teacher))
    assert term(context(student, teacher)).item() == pytest.approx(kdsvd_by_hand(student, teacher), rel=1e-10)
    assert term(context(teacher, teacher)).item() == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(KdrunError, match="kdsvd.k=0 must be a whole number >= 1"):
        KDSVDTerm(shapes_of(student, teacher), k=0)
    with pytest.raises(KdrunError, match="got 1 matched pair"):
        KDSVDTerm(shapes_of(student[:1], teacher[:1]))


# --- the shipped configs and the initialization phase -----------------------------------------------------

def test_method_configs_compose_with_the_reference_defaults():
    expected = {"fsp": (50.0, 30), "ab": (1.0, 30), "ft": (200.0, 30), "kdsvd": (1.0, None)}
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        for method, defaults in expected.items():
            cfg = compose(config_name="config", overrides=[f"distill={method}"])
            term = OmegaConf.to_container(cfg.distill.terms, resolve=True)[method]
            assert TERM_TYPES[term["type"]].__name__.lower().startswith(method)
            assert (term["weight"], term.get("init_epochs")) == defaults


def _pairing(student, teacher, shape):
    s_taps = build_feature_taps(student, "cifar:resnet8", shape)
    t_taps = build_feature_taps(teacher, "cifar:resnet8", shape, role="teacher")
    return FeaturePairing(s_taps, t_taps, *match_stages(s_taps, t_taps))


def _setup(tmp_path, terms, epochs=1):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    data = build_dataset({"name": "synthetic", "image_size": 16, "train_size": 64, "test_size": 32})
    student, teacher = create_model("cifar:resnet8", 10, 3), create_model("cifar:resnet8", 10, 3)
    pairing = _pairing(student, teacher, (3, 16, 16))
    loss = build_loss({"terms": terms}, pairing.shapes((3, 16, 16), 10, 64))
    stage = Stage("student", Recipe(epochs, 0.05, 32, {"name": "sgd", "momentum": 0.9, "weight_decay": 5e-4},
                                    {"name": "cosine"}, 0), torch.device("cpu"), tmp_path, {"model_name": "x"})
    return data, student, StepForward(student, teacher, pairing), loss, stage


def test_init_phase_trains_only_the_paraphraser_for_ft(tmp_path):
    data, student, forward, loss, stage = _setup(tmp_path, {"ce": {"type": "ce"},
                                                            "ft": {"type": "ft", "weight": 200, "init_epochs": 2}})
    before = copy.deepcopy(student.state_dict()), copy.deepcopy(loss.state_dict())
    history = run_init_phase(prepare_training(stage, forward, loss, data.train))
    assert len(history) == 1   # init_epochs=2 capped at the run's 1 epoch
    assert all(torch.equal(v, before[0][n]) for n, v in student.state_dict().items())   # BN statistics included
    moved = {n.split(".")[2] for n, v in loss.state_dict().items() if not torch.equal(v, before[1][n])}
    assert moved == {"paraphraser"}


def test_init_phase_trains_the_student_and_connectors_for_ab_then_training_runs_without_it(tmp_path):
    data, student, forward, loss, stage = _setup(tmp_path, {"ce": {"type": "ce"},
                                                            "ab": {"type": "ab", "init_epochs": 1}}, epochs=1)
    before = copy.deepcopy(student.state_dict())
    training = prepare_training(stage, forward, loss, data.train)
    history = run_init_phase(training)
    assert set(history[0]) == {"init_loss", "init_loss_ab"} and history[0]["init_loss"] > 0
    moved = {n for n, v in student.state_dict().items() if not torch.equal(v, before[n])}
    assert any(n.startswith("stages.") for n in moved) and not any(n.startswith("head") for n in moved)
    result = train(stage, forward, loss, data.train, data.test)   # the main phase: CE alone
    assert result.history[0]["loss_ab"] == 0.0 and result.history[0]["loss"] == result.history[0]["loss_ce"]


def test_kdsvd_gradient_stays_finite_on_rank_deficient_maps():
    # a thin student widened by its 1x1 adapter: rank <= 3 of 32 channels, many equal (zero) singular values,
    # where torch's own SVD gradient (which also pairs the discarded vectors) is nan in float32
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    student = [torch.randn(8, 2, 8, 8).requires_grad_(True), torch.randn(8, 2, 4, 4).requires_grad_(True)]
    teacher = [torch.randn(8, 32, 8, 8).relu(), torch.randn(8, 32, 4, 4).relu()]
    term = KDSVDTerm(shapes_of(student, teacher))
    matrix = term.adapters[0](student[0]).flatten(2).transpose(1, 2)
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    assert not torch.isfinite(torch.autograd.grad(vh[:, :4].sum(), student[0])[0]).all()   # the failure avoided
    term(context(student, teacher)).backward()
    assert all(torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 for s in student)
    assert all(torch.isfinite(p.grad).all() for p in term.parameters())


def test_a_resumed_stage_does_not_initialize_again(tmp_path, monkeypatch):
    import kdrun.engine.trainer as trainer

    calls = []
    monkeypatch.setattr(trainer, "run_init_phase", lambda training: calls.append(training.stage.name))
    data, student, forward, loss, stage = _setup(tmp_path, {"ce": {"type": "ce"},
                                                            "fsp": {"type": "fsp", "init_epochs": 1}}, epochs=2)

    def stop_after_first(epoch, record):
        if epoch == 0:
            raise KeyboardInterrupt   # interrupted after epoch 1 (last.pt written)

    stage.on_epoch = stop_after_first
    with pytest.raises(KeyboardInterrupt):
        train(stage, forward, loss, data.train, data.test)
    stage.on_epoch = None
    result = train(stage, forward, loss, data.train, data.test)   # resumes at epoch 2
    assert calls == ["student"] and len(result.history) == 2
