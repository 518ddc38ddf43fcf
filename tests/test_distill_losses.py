"""The generalised JSD of GKD against a float64 formula written from the paper, its gradient, its ends (forward and
reverse KL) and their limits, and the chunked evaluation against the whole-vocabulary computation."""

import math

import pytest
import torch

from preftune.losses.distill import chunked_divergence, distill_divergences, generalized_jsd


def reference_jsd(student_logits, teacher_logits, beta):
    """Agarwal et al. 2024, eq. for D_JSD(β): β·KL(P ‖ M) + (1-β)·KL(Q ‖ M), M = βP + (1-β)Q; P teacher, Q student;
    written over probabilities, one position at a time, in float64 Python."""
    out = []
    for s_row, t_row in zip(student_logits.tolist(), teacher_logits.tolist()):
        zs, zt = sum(math.exp(v) for v in s_row), sum(math.exp(v) for v in t_row)
        q = [math.exp(v) / zs for v in s_row]
        p = [math.exp(v) / zt for v in t_row]
        if beta == 0:
            out.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        elif beta == 1:
            out.append(sum(qi * math.log(qi / pi) for pi, qi in zip(p, q)))
        else:
            m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
            out.append(beta * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m))
                       + (1 - beta) * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture()
def logits():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(6, 11, generator=generator, dtype=torch.float64) * 2,
            torch.randn(6, 11, generator=generator, dtype=torch.float64) * 2)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_the_paper_formula(logits, beta):
    student, teacher = logits
    got = generalized_jsd(student.log_softmax(-1), teacher.log_softmax(-1), beta)
    torch.testing.assert_close(got, reference_jsd(student, teacher, beta), rtol=1e-12, atol=1e-13)
    assert (got > 0).all()
    same = generalized_jsd(student.log_softmax(-1), student.log_softmax(-1), beta)
    torch.testing.assert_close(same, torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-14)


def test_the_ends_are_the_limits_of_the_divergence_direction(logits):
    student, teacher = logits
    s, t = student.log_softmax(-1), teacher.log_softmax(-1)
    forward, reverse = generalized_jsd(s, t, 0.0), generalized_jsd(s, t, 1.0)
    for small in (1e-4, 1e-6):
        torch.testing.assert_close(generalized_jsd(s, t, small) / small, forward, rtol=50 * small, atol=0)
        torch.testing.assert_close(generalized_jsd(s, t, 1 - small) / small, reverse, rtol=50 * small, atol=0)
    assert not torch.allclose(forward, reverse)   # the two ends are different divergences


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gradcheck_with_respect_to_the_student(logits, beta):
    student, teacher = logits
    student = student.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: generalized_jsd(x.log_softmax(-1), teacher.log_softmax(-1), beta),
                                    (student,))


def test_chunked_divergence_equals_the_whole_vocabulary_computation_and_its_gradient():
    generator = torch.Generator().manual_seed(1)
    student_head = torch.nn.Linear(5, 13, bias=False).double()
    teacher_head = torch.nn.Linear(7, 15, bias=False).double()   # a wider (padded) teacher head: first 13 compared
    hs = torch.randn(9, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(9, 7, generator=generator, dtype=torch.float64)
    divergence = lambda s, t: generalized_jsd(s, t, 0.4)  # noqa: E731
    chunked = chunked_divergence(hs, ht, student_head, teacher_head, divergence, temperature=0.7, chunk_size=2)
    whole = reference_jsd(student_head(hs).detach() / 0.7, teacher_head(ht)[:, :13].detach() / 0.7, 0.4)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-13)
    chunked.sum().backward()
    chunked_grad = (hs.grad.clone(), student_head.weight.grad.clone())
    hs.grad = None
    student_head.weight.grad = None
    s = (student_head(hs) / 0.7).log_softmax(-1)
    t = (teacher_head(ht)[:, :13] / 0.7).log_softmax(-1)
    generalized_jsd(s, t.detach(), 0.4).sum().backward()
    torch.testing.assert_close(chunked_grad[0], hs.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked_grad[1], student_head.weight.grad, rtol=1e-10, atol=1e-12)
    assert teacher_head.weight.grad is None   # the teacher never gets a gradient
    both = distill_divergences(s.detach(), t.detach(), 0.4)
    torch.testing.assert_close(both[:, 1], reference_jsd(s.detach(), t.detach(), 0.0))
    torch.testing.assert_close(both[:, 2], reference_jsd(s.detach(), t.detach(), 1.0))
