"""Caption decoder, tokenizer and beam search on tiny random models, each checked against an oracle:
the full teacher-forced forward for the cache, a naive greedy loop for beam 1, exhaustive search
for beam K, one image at a time for the batch."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from captioning.decoding import beam_search, beam_search_hypotheses, length_penalty_factor
from captioning.model import CaptionDecoder, DecoderConfig
from captioning.tokenizer import WordTokenizer

BOS, EOS = 1, 2
GRID_DIM = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Hundreds of tiny ops: intra-op threads only add overhead, and on a busy machine spinning
    threads made this module take 100 s instead of 1.5 s. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(vocab: int = 20, seed: int = 0, max_len: int = 16, std: float | None = 0.5,
               dropout: float = 0.0) -> CaptionDecoder:
    """A 2-layer, 32-d decoder. ``std`` re-draws every weight matrix so the next-token
    distributions are peaked and differ between positions and images (the default init is nearly
    uniform); LayerNorm gains and biases keep their initial values."""
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=vocab, grid_dim=GRID_DIM, d_model=32, n_layers=2, n_heads=2,
                        d_ff=64, dropout=dropout, max_len=max_len)
    model = CaptionDecoder(cfg)
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std)
    return model.eval()


def grids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, GRID_DIM, 7, 7, generator=torch.Generator().manual_seed(seed))  # (n, 8, 7, 7)


def full_log_probs(model: CaptionDecoder, grid1: torch.Tensor, seq: list[int]) -> torch.Tensor:
    """(len(seq) + 1, V) next-token log-probs after <bos>, w1, ..., wn, from the full forward."""
    tokens = torch.tensor([[BOS, *seq]])
    with torch.no_grad():
        return model(grid1, tokens)[0].float().log_softmax(-1)


def rescore(model: CaptionDecoder, grid1: torch.Tensor, seq: list[int], alpha: float) -> float:
    """The beam search objective computed independently: log P(seq, <eos>) / lp(len(seq) + 1)."""
    logp = full_log_probs(model, grid1, seq)
    targets = [*seq, EOS]
    total = sum(logp[i, w].item() for i, w in enumerate(targets))
    return total / length_penalty_factor(len(targets), alpha)


def naive_greedy(model: CaptionDecoder, grid1: torch.Tensor, max_len: int, min_len: int) -> list[int]:
    """Oracle: re-run the full forward on the whole prefix every step and take the arg-max."""
    seq: list[int] = []
    for t in range(max_len):
        logp = full_log_probs(model, grid1, seq)[-1]  # (V,)
        logp[BOS] = -math.inf
        if t < min_len:
            logp[EOS] = -math.inf
        tok = int(logp.argmax())
        if tok == EOS:
            break
        seq.append(tok)
    return seq


# --- tokenizer ------------------------------------------------------------------------------

CAPTIONS = [
    "A dog runs on the grass.",
    "a dog, a cat!",
    "The dog's ball is red .",
    "A cat sleeps on the red sofa.",
    "Two dogs play on the grass",
]


def test_tokenizer_round_trip_specials_and_unknown_words():
    tok = WordTokenizer.build(CAPTIONS, min_count=2)
    assert tok.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    ids = tok.encode("A DOG on the red grass.", max_len=20)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.unk_id not in ids
    assert tok.decode(ids) == "a dog on the red grass ."
    unknown = tok.encode("a zebra on the red grass", max_len=20)
    assert unknown[2] == tok.unk_id  # "zebra" was never seen
    assert tok.decode(unknown) == "a on the red grass"  # specials, <unk> included, are dropped
    # decode stops at the first <eos> and skips <pad>/<bos>
    assert tok.decode([tok.bos_id, tok.stoi["dog"], tok.eos_id, tok.stoi["cat"], 0]) == "dog"
    assert tok.decode(torch.tensor([tok.stoi["red"], tok.pad_id, tok.stoi["dog"]])) == "red dog"
    # special tokens written in text cannot produce special ids
    assert tok.encode("<eos>", max_len=10)[1:-1] == [tok.unk_id, tok.unk_id, tok.unk_id]


def test_tokenizer_min_count_order_and_truncation():
    tok = WordTokenizer.build(CAPTIONS, min_count=2)
    words = tok.itos[4:]
    assert "sofa" not in words and "cat" in words  # 1 occurrence vs 2
    # most frequent first, ties in alphabetical order: a, the: 4; ".", on: 3; cat, dog, grass, red: 2
    assert words == ["a", "the", ".", "on", "cat", "dog", "grass", "red"]
    assert set(WordTokenizer.build(CAPTIONS, min_count=1).itos) >= {"sofa", "dog's", ",", "!"}
    assert WordTokenizer.build(list(reversed(CAPTIONS)), min_count=2).itos == tok.itos  # deterministic
    ids = tok.encode("a dog on the red grass a dog on the red grass", max_len=5)
    assert len(ids) == 5 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(tok) == len(tok.itos)
    with pytest.raises(ValueError):
        WordTokenizer.build(CAPTIONS, min_count=0)
    with pytest.raises(ValueError):
        tok.encode("a dog", max_len=1)


def test_tokenizer_saves_inside_a_weights_only_torch_file(tmp_path: Path):
    tok = WordTokenizer.build(CAPTIONS, min_count=1)
    path = tmp_path / "captioner.pt"
    torch.save({"tokenizer": tok.to_dict(), "state_dict": {"w": torch.zeros(2)}}, path)
    loaded = WordTokenizer.from_dict(torch.load(path, weights_only=True)["tokenizer"])
    assert loaded.itos == tok.itos and len(loaded) == len(tok)
    assert loaded.encode("the dog's red sofa!", 12) == tok.encode("the dog's red sofa!", 12)
    with pytest.raises(ValueError):
        WordTokenizer.from_dict({"format": "something-else", "itos": tok.itos})
    with pytest.raises(ValueError):
        WordTokenizer.from_dict({**tok.to_dict(), "itos": ["a", "b"]})


# --- model ----------------------------------------------------------------------------------

def test_forward_shapes_and_argument_checks():
    model = tiny_model(std=None, dropout=0.1)
    g = grids(3)
    memory = model.encode(g)
    assert memory.shape == (3, 49, 32)
    tokens = torch.randint(0, 20, (3, 9))
    logits = model(g, tokens)
    assert logits.shape == (3, 9, 20) and torch.isfinite(logits).all()
    assert model.lm_head.weight is model.tok_emb.weight  # tied embeddings
    with pytest.raises(ValueError):
        model(torch.randn(3, GRID_DIM + 1, 7, 7), tokens)
    with pytest.raises(ValueError):
        model(torch.randn(3, GRID_DIM, 6, 6), tokens)
    with pytest.raises(ValueError):
        model(g, torch.randint(0, 20, (3, 17)))  # max_len is 16
    with pytest.raises(ValueError):
        DecoderConfig(vocab_size=20, d_model=30, n_heads=4)


def test_causal_and_image_dependent():
    model = tiny_model()
    g = grids(2)
    tokens = torch.randint(3, 20, (2, 10))
    with torch.no_grad():
        base = model(g, tokens)
        for t in range(9):
            changed = tokens.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1 - 3) % 17 + 3  # another non-special token
            out = model(g, changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, t + 1], base[:, t + 1])
        other = model(grids(2, seed=7), tokens)
    assert not torch.allclose(other, base)  # the caption depends on the image


def test_cached_steps_equal_teacher_forced_forward():
    model = tiny_model(max_len=12)
    g = grids(3)
    tokens = torch.randint(0, 20, (3, 12))
    tokens[:, 0] = BOS
    with torch.no_grad():
        full = model(g, tokens)  # (3, 12, 20)
        memory = model.encode(g)
        cache = None
        steps = []
        for t in range(12):
            logits, cache = model.step(tokens[:, t : t + 1], memory, cache)
            steps.append(logits)
            assert cache.length == t + 1
        with pytest.raises(ValueError):
            model.step(tokens[:, :1], memory, cache)  # position 12 is past max_len
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=1e-5, atol=1e-4)  # logits ~ 10


def test_cache_reorder_follows_rows():
    model = tiny_model()
    g = grids(3)
    tokens = torch.randint(3, 20, (3, 4))
    tokens[:, 0] = BOS
    with torch.no_grad():
        memory = model.encode(g)
        cache = None
        for t in range(3):
            _, cache = model.step(tokens[:, t : t + 1], memory, cache)
        order = torch.tensor([2, 0, 0])
        logits, _ = model.step(tokens[order, 3:4], memory[order], cache.reorder(order))
        full = model(g[order], tokens[order])[:, 3]
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-4)


# --- decoding -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 4, 5])
def test_beam_one_is_naive_greedy(seed: int):
    model = tiny_model(seed=seed)
    with torch.no_grad():
        model.lm_head.bias[EOS] = 2.5  # so that some captions end before max_len
    g = grids(6, seed=seed + 10)
    for min_len in (0, 2):
        got = beam_search(model, g, BOS, EOS, beam_size=1, max_len=10, min_len=min_len)
        want = [naive_greedy(model, g[i : i + 1], max_len=10, min_len=min_len) for i in range(6)]
        assert got == want
    assert any(0 < len(s) < 10 for s in got)  # some captions end by <eos>, not by max_len


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_finds_exhaustive_optimum_on_tiny_vocabulary(alpha: float):
    """Vocabulary {0, bos, eos, 3}: with words 0 and 3 and up to 3 words there are 14 captions.
    A beam wide enough never to prune (16 >= every step's candidates) must return the exhaustive
    best under the same length penalty; greedy is never better."""
    model = tiny_model(vocab=4, seed=3, max_len=4, std=1.0)
    g = grids(8, seed=4)
    captions = [list(c) for n in (1, 2, 3) for c in itertools.product((0, 3), repeat=n)]
    assert len(captions) == 14
    best = beam_search_hypotheses(model, g, bos_id=BOS, eos_id=EOS, beam_size=16, max_len=3,
                                  length_penalty=alpha, banned_ids=())
    greedy = beam_search(model, g, BOS, EOS, beam_size=1, max_len=3, length_penalty=alpha)
    differs = 0
    for i in range(8):
        gi = g[i : i + 1]
        scored = {tuple(c): rescore(model, gi, c, alpha) for c in captions}
        optimum = max(scored.values())
        top = best[i][0]
        assert top.score == pytest.approx(optimum, rel=1e-5)
        assert top.score == pytest.approx(rescore(model, gi, top.tokens, alpha), rel=1e-5)
        assert rescore(model, gi, greedy[i], alpha) <= top.score + 1e-4
        differs += tuple(greedy[i]) != tuple(top.tokens)
    assert differs > 0  # the oracle has power: greedy misses the optimum somewhere


def test_reported_scores_match_full_forward_rescoring():
    model = tiny_model(seed=5)
    g = grids(4, seed=5)
    results = beam_search_hypotheses(model, g, BOS, EOS, beam_size=4, max_len=8, length_penalty=0.7)
    for i, hyps in enumerate(results):
        assert 1 <= len(hyps) <= 4
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            assert h.score == pytest.approx(rescore(model, g[i : i + 1], h.tokens, 0.7), rel=1e-5)
            assert h.log_prob == pytest.approx(rescore(model, g[i : i + 1], h.tokens, 0.0), rel=1e-5)


def test_batched_beam_search_equals_one_image_at_a_time():
    model = tiny_model(seed=6)
    g = grids(7, seed=6)
    kwargs = dict(beam_size=3, max_len=12, length_penalty=1.0, no_repeat_ngram_size=2, min_len=1)
    batched = beam_search_hypotheses(model, g, BOS, EOS, **kwargs)
    lengths = set()
    for i in range(7):
        alone = beam_search_hypotheses(model, g[i : i + 1], BOS, EOS, **kwargs)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in batched[i]], rel=1e-5)
        lengths.add(len(batched[i][0].tokens))
    assert len(lengths) > 1  # images finish at different steps, so the batch shrinks on the way


def _repetitive_model(favourite: int = 5) -> CaptionDecoder:
    """Near-uniform model whose output bias makes one word dominate and <eos> unlikely."""
    model = tiny_model(seed=7, std=None)
    with torch.no_grad():
        model.lm_head.bias[favourite] = 8.0
        model.lm_head.bias[EOS] = -8.0
    return model


def _ngrams(seq: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def test_no_repeat_ngram_size_bans_repeated_bigrams():
    model = _repetitive_model()
    g = grids(3)
    plain = beam_search(model, g, BOS, EOS, beam_size=3, max_len=10)
    assert all(len(set(_ngrams(s, 2))) < len(_ngrams(s, 2)) for s in plain)  # it does repeat
    for k in (1, 3):
        for hyps in beam_search_hypotheses(model, g, BOS, EOS, beam_size=k, max_len=10, no_repeat_ngram_size=2):
            for h in hyps:
                assert len(h.tokens) == 10
                assert len(set(_ngrams(h.tokens, 2))) == len(_ngrams(h.tokens, 2)), h.tokens
    unigram = beam_search(model, g, BOS, EOS, beam_size=2, max_len=10, no_repeat_ngram_size=1)
    assert all(len(set(s)) == len(s) == 10 for s in unigram)


def test_max_len_min_len_eos_and_banned_ids():
    g = grids(4)
    long_model = _repetitive_model()
    for k in (1, 3):
        out = beam_search(long_model, g, BOS, EOS, beam_size=k, max_len=6, banned_ids=[5, 0])
        assert all(len(s) == 6 for s in out)  # <eos> is forced at max_len
        assert all(not {BOS, EOS, 5, 0} & set(s) for s in out)
    short_model = tiny_model(seed=8, std=None)
    with torch.no_grad():
        short_model.lm_head.bias[EOS] = 8.0
    for k in (1, 3):
        for min_len in (0, 1, 3):
            out = beam_search(short_model, g, BOS, EOS, beam_size=k, max_len=6, min_len=min_len)
            assert all(len(s) == min_len for s in out)  # <eos> ends the caption as soon as allowed
            assert all(EOS not in s and BOS not in s for s in out)


def test_no_end_after_keeps_eos_from_following_those_tokens():
    short_model = tiny_model(seed=8, std=None)
    with torch.no_grad():
        short_model.lm_head.bias[EOS] = 8.0  # it wants to stop at once...
    g = grids(4)
    for k in (1, 3):
        first = beam_search(short_model, g, BOS, EOS, beam_size=k, max_len=6, min_len=1)
        assert all(len(s) == 1 for s in first)
        ends = sorted({s[-1] for s in first})  # ...after these words: forbid ending on them
        out = beam_search(short_model, g, BOS, EOS, beam_size=k, max_len=8, min_len=1, no_end_after=ends,
                          no_repeat_ngram_size=1)  # (no word twice, so it must move on to other words)
        assert all(s[-1] not in ends or len(s) == 8 for s in out), out  # only max_len may end on one
        assert any(s[-1] not in ends for s in out), out
        # at max_len the caption still ends, whatever its last word
        capped = beam_search(short_model, g, BOS, EOS, beam_size=k, max_len=1, min_len=1,
                             no_end_after=list(range(4, short_model.cfg.vocab_size)))
        assert all(len(s) == 1 for s in capped)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        beam_search(short_model, g, BOS, EOS, max_len=6, no_end_after=[10**6])


def test_training_flag_is_restored_and_dropout_is_off_while_decoding():
    model = tiny_model(seed=9, dropout=0.5)
    g = grids(3)
    want = beam_search(model, g, BOS, EOS, beam_size=2, max_len=8)
    model.train()
    assert beam_search(model, g, BOS, EOS, beam_size=2, max_len=8) == want
    assert model.training
    assert beam_search(model, g[:0], BOS, EOS, max_len=8) == []  # an empty batch is not an error


@pytest.mark.parametrize("kwargs", [
    dict(beam_size=0), dict(max_len=0), dict(max_len=16), dict(min_len=9, max_len=8),
    dict(no_repeat_ngram_size=-1), dict(banned_ids=[EOS]), dict(banned_ids=[20]),
    dict(length_penalty=math.nan),
])
def test_bad_arguments_raise_value_error(kwargs: dict):
    model = tiny_model()
    with pytest.raises(ValueError):
        beam_search(model, grids(1), BOS, EOS, **kwargs)
