import numpy as np
import pytest

from gptjax.data import pipeline
from gptjax.data.pipeline import (
    PackedWindows,
    eval_batches,
    train_iterator,
    unigram_perplexity,
)


@pytest.mark.parametrize("n", [2, 17, 33, 34, 100])
def test_packing_keeps_every_token_exactly_once(n):
    stream = np.arange(1000, 1000 + n, dtype=np.uint16)
    windows = PackedWindows(stream, n_ctx=16, pad_id=7)
    inputs, targets = [], []
    for i in range(len(windows)):
        w = windows[i]
        assert w["tokens"].shape == (17,) and w["weights"].shape == (16,)
        real = w["weights"] > 0
        inputs.append(w["tokens"][:-1][real])
        targets.append(w["tokens"][1:][real])
        assert np.all(w["tokens"][1:][~real] == 7)  # padding beyond the stream
    # Read in order, the inputs are the stream but its last token and the targets the
    # stream but its first: each position predicted once, none lost or repeated.
    np.testing.assert_array_equal(np.concatenate(inputs), stream[:-1])
    np.testing.assert_array_equal(np.concatenate(targets), stream[1:])
    # Each window is contiguous text: every target is the token after its input.
    for i in range(len(windows)):
        w = windows[i]
        real = w["weights"] > 0
        np.testing.assert_array_equal(w["tokens"][1:][real] - w["tokens"][:-1][real], 1)


def test_train_iterator_visits_every_window_each_epoch_in_new_order():
    windows = PackedWindows(np.arange(8 * 4 + 1), n_ctx=4, pad_id=0)
    it = train_iterator(windows, global_batch_size=4, seed=3)
    epochs = [np.concatenate([next(it)["tokens"][:, 0] for _ in range(2)]) for _ in range(2)]
    for firsts in epochs:
        assert sorted(firsts.tolist()) == list(range(0, 32, 4))
    assert epochs[0].tolist() != epochs[1].tolist()


def test_the_seed_sets_the_order_and_the_same_seed_repeats_it():
    """`train.seed` sets the data order (a fine-tuning sweep's seeds differ in it)."""
    windows = PackedWindows(np.arange(16 * 4 + 1), n_ctx=4, pad_id=0)

    def firsts(seed):
        it = train_iterator(windows, global_batch_size=4, seed=seed)
        return np.concatenate([next(it)["tokens"][:, 0] for _ in range(3)]).tolist()

    assert firsts(0) == firsts(0)
    assert firsts(0) != firsts(1)


def test_a_cached_stream_of_another_fingerprint_or_cut_short_is_not_used(tmp_path):
    """The cache's own checks, behind data.json's: another corpus or tokenizer is
    StaleCache (a resume refuses it); a stream shorter than its record is made again."""
    path = str(tmp_path / "train.npy")
    pipeline.save_tokens(path, np.arange(10, dtype=np.uint16), "corpus:tok")
    np.testing.assert_array_equal(pipeline.load_cached_tokens(path, "corpus:tok"), np.arange(10))
    with pytest.raises(pipeline.StaleCache):
        pipeline.load_cached_tokens(path, "other:tok")
    np.save(path, np.arange(7, dtype=np.uint16))  # its record still says 10 tokens
    assert pipeline.load_cached_tokens(path, "corpus:tok") is None


def test_train_iterator_resumes_from_state():
    windows = PackedWindows(np.arange(50 * 4 + 1), n_ctx=4, pad_id=0)
    it = train_iterator(windows, global_batch_size=4, seed=0)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it)["tokens"] for _ in range(20)]  # crosses an epoch boundary
    resumed = train_iterator(windows, global_batch_size=4, seed=0)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["tokens"], want)


def test_processes_read_their_rows_of_the_same_global_batches():
    windows = PackedWindows(np.arange(16 * 4 + 1), n_ctx=4, pad_id=0)
    single = train_iterator(windows, global_batch_size=4, seed=0)
    parts = [
        train_iterator(windows, global_batch_size=4, seed=0, process_index=p, process_count=2)
        for p in range(2)
    ]
    for _ in range(6):  # crosses an epoch boundary
        whole = next(single)["tokens"]
        halves = [next(it)["tokens"] for it in parts]
        assert all(h.shape == (2, 5) for h in halves)
        np.testing.assert_array_equal(np.concatenate(halves), whole)


def test_eval_batches_cover_each_window_once_with_padding():
    windows = PackedWindows(np.arange(10 * 4 + 1), n_ctx=4, pad_id=0)
    batches = list(eval_batches(windows, global_batch_size=4))
    assert len(batches) == 3 and all(b["tokens"].shape == (4, 5) for b in batches)
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.sum() == 40  # every target once; the 2 padding rows weigh nothing
    assert len(list(eval_batches(windows, global_batch_size=4, max_batches=2))) == 2


def test_eval_batches_on_several_processes_cover_each_window_once():
    windows = PackedWindows(np.arange(9 * 4 + 1), n_ctx=4, pad_id=0)
    per_process = [
        list(eval_batches(windows, global_batch_size=4, process_index=p, process_count=2))
        for p in range(2)
    ]
    # The same number of same-shaped batches everywhere (no process waits on another).
    assert len(per_process[0]) == len(per_process[1]) == 3
    firsts = [
        int(b["tokens"][r, 0])
        for batches in per_process
        for b in batches
        for r in range(2)
        if b["weights"][r].sum() > 0
    ]
    assert sorted(firsts) == list(range(0, 36, 4))


def test_unigram_perplexity():
    train = np.array([0, 0, 1, 1])
    # add-one smoothing over 2 symbols: p = 3/6 each -> perplexity 2
    assert unigram_perplexity(train, np.array([5, 0, 1, 0]), vocab_size=2) == pytest.approx(2)


def test_unigram_counts_in_parts_are_the_counts_of_the_whole(monkeypatch):
    rng = np.random.default_rng(0)
    train, evals = rng.integers(0, 50, 1000).astype(np.uint16), rng.integers(0, 50, 100)
    whole = unigram_perplexity(train, evals, vocab_size=50)
    monkeypatch.setattr(pipeline, "UNIGRAM_PART", 7)  # 143 parts, the last one short
    assert unigram_perplexity(train, evals, vocab_size=50) == pytest.approx(whole, rel=1e-12)


def test_batched_reads_give_the_batches_of_one_window_at_a_time():
    """train_iterator reads PackedWindows a batch at a time (`gather`); a source read a
    window at a time through grain must give the same batches in the same order."""

    class OneAtATime:  # PackedWindows without its `gather`
        def __init__(self, windows):
            self.windows = windows

        def __len__(self):
            return len(self.windows)

        def __getitem__(self, i):
            return self.windows[i]

    windows = PackedWindows(np.arange(23 * 4 + 2), n_ctx=4, pad_id=9)  # a padded last window
    fast = train_iterator(windows, global_batch_size=6, seed=5)
    slow = train_iterator(OneAtATime(windows), global_batch_size=6, seed=5)
    for _ in range(10):  # crosses epoch boundaries
        a, b = next(fast), next(slow)
        for k in ("tokens", "weights"):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            np.testing.assert_array_equal(a[k], b[k])
    assert fast.get_state() == slow.get_state()


def test_gather_checks_its_indices():
    windows = PackedWindows(np.arange(9), n_ctx=4, pad_id=0)
    assert windows.gather(np.array([], np.int64))["tokens"].shape == (0, 5)
    for bad in ([-1], [2]):
        with pytest.raises(IndexError):
            windows.gather(np.array(bad))
