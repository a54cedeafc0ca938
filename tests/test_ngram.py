"""The n-gram judge against interpolated Kneser-Ney computed by brute force from its definition (Chen and
Goodman 1998, section 3.5) with plain Python counters, and its normalisation over the whole alphabet."""

import itertools
import math
from collections import Counter

import pytest

from mlx_dlm.errors import UserError
from mlx_dlm.ngram import NGramModel

TOY = "abracadabra, a cab; dad had a bad cab.\nabba baa caca dada\n"


def brute_force_kn(text: str, order: int):
    """P(w | h) by the textbook recursion, every count taken by scanning all substrings of the text."""
    alphabet = sorted(set(text))
    size = len(alphabet) + 1  # the extra slot for unseen characters
    raw = Counter(text[i:i + k] for k in range(1, order + 1) for i in range(len(text) - k + 1))
    preceded = {}  # continuation counts: distinct characters before each k-gram
    for k in range(1, order):
        for i in range(1, len(text) - k + 1):
            preceded.setdefault(text[i:i + k], set()).add(text[i - 1])
    cont = Counter({g: len(s) for g, s in preceded.items()})

    def counts_of(k):
        return Counter({g: c for g, c in (raw if k == order else cont).items() if len(g) == k})

    def discount(k):
        c = counts_of(k)
        n1, n2 = sum(v == 1 for v in c.values()), sum(v == 2 for v in c.values())
        return n1 / (n1 + 2 * n2)

    discounts = {k: discount(k) for k in range(1, order + 1)}

    def p(h: str, w: str, k: int) -> float:
        if k == 0:
            return 1 / size
        counts = counts_of(k)
        following = {g[-1]: c for g, c in counts.items() if g[:-1] == h}
        lower = p(h[1:], w, k - 1)
        total = sum(following.values())
        if total == 0:
            return lower
        d = discounts[k]
        return (max(following.get(w, 0) - d, 0) + d * len(following) * lower) / total

    return alphabet, lambda h, w: p(h, w, len(h) + 1)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_probabilities_match_brute_force_counts(order):
    model = NGramModel.fit(TOY, order)
    alphabet, reference = brute_force_kn(TOY, order)
    contexts = {TOY[i:i + order - 1] for i in range(len(TOY) - order + 2)} | {"zz"[:order - 1], "q" * (order - 1)}
    for h, w in itertools.product(sorted(contexts), alphabet + ["Z"]):
        assert model.prob(h, w) == pytest.approx(reference(h, w), rel=1e-12), (h, w)


@pytest.mark.parametrize("order", [2, 3, 5])
def test_each_context_distribution_sums_to_one(order):
    """Over the alphabet plus the unseen-character slot (one unseen character stands for it), for every context
    of the text, unseen contexts, and contexts holding an unseen character."""
    model = NGramModel.fit(TOY, order)
    alphabet = sorted(set(TOY)) + ["Z"]
    contexts = {TOY[i:i + order - 1] for i in range(len(TOY) - order + 2)} | {"Z" * (order - 1), "ab"[:order - 1]}
    for h in contexts:
        assert sum(model.prob(h, w) for w in alphabet) == pytest.approx(1.0, abs=1e-12), h


def test_completion_nll_scores_only_after_the_start_and_batches_like_one_text():
    model = NGramModel.fit(TOY, 3)
    texts = ["abracadabra", "a bad cab;", "dad had a b", "Zebra!"]
    one_by_one = [-sum(math.log(model.prob(t[:i], t[i])) for i in range(4, len(t))) for t in texts]
    assert model.completion_nll(texts, 4) == pytest.approx(one_by_one, rel=1e-12)
    assert model.completion_nll(["abc"], 3)[0] == 0.0  # nothing after the start


def test_a_higher_order_model_fits_its_own_text_better():
    nll = [NGramModel.fit(TOY, k).completion_nll([TOY], 0)[0] for k in (1, 2, 4)]
    assert nll[0] > nll[1] > nll[2]


def test_bad_orders_are_refused():
    with pytest.raises(UserError, match="at least 1"):
        NGramModel.fit(TOY, 0)
    with pytest.raises(UserError, match="at least 5 characters"):
        NGramModel.fit("abc", 5)
