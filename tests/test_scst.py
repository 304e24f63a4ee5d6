"""Self-critical sequence training: reward, baseline, sampling and one update on a tiny decoder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from captioning.decoding import sample
from captioning.metrics import (
    CiderD,
    SentenceBleu,
    bleu,
    cider_d,
    cider_document_frequency,
    ptb_tokenize,
)
from captioning.model import CaptionDecoder, DecoderConfig
from captioning.training.scst import (
    CaptionReward,
    ScstConfig,
    never_sampled,
    sample_rewards,
    scst_loss,
    scst_step,
    self_critical_advantage,
    token_log_probs,
)
from captioning.tokenizer import WordTokenizer

REFS = {
    "a": [["a", "dog", "runs", "on", "the", "grass"], ["a", "brown", "dog", "runs"], ["the", "dog", "is", "running"]],
    "b": [["a", "man", "rides", "a", "bike"], ["a", "person", "on", "a", "bicycle"]],
    "c": [["two", "children", "play", "in", "the", "snow"], ["kids", "playing", "in", "snow"],
          ["a", "child", "in", "snow"]],
}
WORDS = ["a", "dog", "runs", "the", "grass", "man", "rides", "bike", "in", "snow", "two", "children", "play", "on"]


def tiny_model(vocab: int, seed: int = 0, max_len: int = 12) -> CaptionDecoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=vocab, grid_dim=8, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                        dropout=0.1, max_len=max_len, grid_size=2)
    return CaptionDecoder(cfg)


def tiny_tokenizer() -> WordTokenizer:
    return WordTokenizer.build([" ".join(WORDS)], min_count=1)


def test_cider_scorer_matches_corpus_cider_d():
    hyps = {"a": ["a", "dog", "runs"], "b": ["a", "man", "on", "a", "bike"], "c": []}
    scorer = CiderD(REFS)
    per_image = [scorer.score(k, hyps[k]) for k in REFS]
    assert sum(per_image) / len(per_image) == pytest.approx(cider_d(REFS, hyps), abs=1e-15)
    assert scorer.scores(list(hyps), list(hyps.values())) == per_image
    # a one-image corpus: the per-image score is the corpus score
    assert CiderD({"a": REFS["a"]}).score("a", hyps["a"]) == pytest.approx(cider_d({"a": REFS["a"]}, {"a": hyps["a"]}))
    # document frequency counts images, not references: "dog" is in 3 references of one image
    df = scorer.df
    assert df[("dog",)] == 1 and df[("a",)] == 3 and df[("snow",)] == 1 and df[("in", "snow")] == 1
    assert cider_document_frequency([[{("x",): 2}], [{("x",): 1, ("y",): 1}]]) == {("x",): 2, ("y",): 1}


def test_sample_rewards_score_decoded_text_against_train_references():
    tok = tiny_tokenizer()
    scorer = CiderD(REFS)
    enc = [tok.encode("a dog runs", 10)[1:], tok.encode("two children play in the snow", 10)[1:]]  # words + eos
    T = max(map(len, enc))
    rows = torch.tensor([e + [tok.pad_id] * (T - len(e)) for e in enc])  # (2, T)
    tokens = torch.cat([rows[:1], rows[:1], rows[1:], rows[1:]])  # two images x two samples
    r = sample_rewards(scorer, ["a", "c"], tokens, tok)
    assert r.shape == (2, 2)
    assert r[0, 0] == pytest.approx(scorer.score("a", ptb_tokenize("a dog runs")))
    assert r[1, 1] == pytest.approx(scorer.score("c", ptb_tokenize("two children play in the snow")))


def test_self_critical_baseline_is_the_mean_of_the_other_samples():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]])
    adv = self_critical_advantage(rewards)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(2), atol=1e-6)
    assert adv[0, 0].item() == pytest.approx(1.0 - (2 + 3 + 6) / 3)
    assert torch.equal(adv[1], torch.zeros(4))
    with pytest.raises(ValueError):
        self_critical_advantage(torch.ones(3, 1))


def test_sample_respects_max_len_eos_and_bans():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    model.train()
    grid = torch.randn(3, 8, 2, 2)
    gen = torch.Generator().manual_seed(0)
    out = sample(model, grid, tok.bos_id, tok.eos_id, tok.pad_id, n_samples=4, max_len=5,
                 banned_ids=(tok.unk_id,), generator=gen)
    assert model.training  # the training flag is restored
    assert out.shape[0] == 12 and out.shape[1] <= 6
    for row in out.tolist():
        assert tok.eos_id in row  # every sample ends, at the latest after max_len words
        end = row.index(tok.eos_id)
        assert end <= 5
        assert all(t == tok.pad_id for t in row[end + 1:])
        assert not {tok.bos_id, tok.unk_id, tok.pad_id} & set(row[:end])
    # the same generator seed gives the same samples
    again = sample(model, grid, tok.bos_id, tok.eos_id, tok.pad_id, n_samples=4, max_len=5,
                   banned_ids=(tok.unk_id,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_sample_with_a_model_that_prefers_eos_stops_at_once():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    with torch.no_grad():
        model.lm_head.bias.fill_(-30.0)
        model.lm_head.bias[tok.eos_id] = 30.0
    out = sample(model, torch.randn(2, 8, 2, 2), tok.bos_id, tok.eos_id, tok.pad_id, n_samples=3, max_len=5)
    assert out.tolist() == [[tok.eos_id]] * 6


def test_token_log_probs_match_incremental_decoding():
    """Teacher-forced log-probs of a sample equal the per-step log-probs the sampler used."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).eval()
    never = never_sampled(tok)
    grid = torch.randn(1, 8, 2, 2)
    tokens = sample(model, grid, tok.bos_id, tok.eos_id, tok.pad_id, n_samples=1, max_len=6,
                    banned_ids=(tok.unk_id,), generator=torch.Generator().manual_seed(1))  # (1, T)
    memory = model.encode(grid)
    with torch.no_grad():
        lp = token_log_probs(model, memory, tokens, tok.bos_id, never)[0]
        cache, last, expected = None, torch.tensor([[tok.bos_id]]), []
        for t in tokens[0].tolist():
            if t == tok.pad_id:
                break
            logits, cache = model.step(last, memory, cache)
            expected.append(torch.log_softmax(logits[0].masked_fill(never, float("-inf")), -1)[t].item())
            last = torch.tensor([[t]])
    assert lp[: len(expected)].tolist() == pytest.approx(expected, abs=1e-5)


def test_one_scst_step_changes_parameters_with_a_finite_loss(tmp_path: Path):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    refs = {i: [[w for w in WORDS[i:i + 4]], [w for w in WORDS[i + 2:i + 6]]] for i in range(4)}
    scorer = CiderD(refs)
    cfg = ScstConfig(data=tmp_path, out=tmp_path / "x.pt", cache_dir=tmp_path, n_samples=4, max_words=6, lr=1e-2)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = scst_step(model, opt, torch.randn(4, 8, 2, 2), [0, 1, 2, 3], scorer, tok, cfg,
                      never_sampled(tok), torch.Generator().manual_seed(0))
    assert math.isfinite(stats["loss"]) and stats["reward"] >= 0.0 and 0 <= stats["at_max"] <= 1
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "tok_emb.weight" in changed and "grid_proj.weight" in changed


def test_scst_loss_ignores_pads_and_forced_eos_and_vanishes_without_advantage():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).eval()
    never = never_sampled(tok)
    grid = torch.randn(1, 8, 2, 2)
    w = tok.stoi["dog"]
    tokens = torch.tensor([[w, w, w, tok.eos_id], [w, tok.eos_id, tok.pad_id, tok.pad_id]])  # (2, 4)
    zero = scst_loss(model, grid, tokens, torch.zeros(1, 2), tok, never, max_words=3)
    assert zero.item() == 0.0
    adv = torch.tensor([[1.0, -1.0]])
    loss = scst_loss(model, grid, tokens, adv, tok, never, max_words=3)
    lp = token_log_probs(model, model.encode(grid).repeat_interleave(2, 0), tokens, tok.bos_id, never)
    # row 0: three words scored, its <eos> after max_words=3 words is forced and not scored;
    # row 1: one word and its <eos>; 5 scored tokens in all
    expected = -(lp[0, :3].sum() - lp[1, :2].sum()) / 5
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_cli_train_captioner_scst_builds_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    import captioning.training.scst as scst
    from indexer.cli import main

    seen: list[ScstConfig] = []

    def fake_train(cfg: ScstConfig) -> dict:
        seen.append(cfg)
        return {"model_choice": "step 0", "seconds": 0.0, "dev": {}}

    monkeypatch.setattr(scst, "train_scst", fake_train)
    assert main(["train", "captioner", "--scst", "--data", str(tmp_path), "--out", str(tmp_path / "v2.pt"),
                 "--init", str(tmp_path / "v1.pt"), "--samples", "4", "--lr", "3e-5", "--flip", "-q",
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--bleu-weight", "0.5"]) == 0
    cfg = seen[0]
    assert cfg.bleu_weight == 0.5
    assert cfg.init == tmp_path / "v1.pt" and cfg.n_samples == 4 and cfg.lr == 3e-5 and cfg.flip_augment
    assert cfg.epochs == 5 and cfg.cache_dir == tmp_path / "cache" / "features"
    assert main(["train", "captioner", "--scst", "--data", str(tmp_path), "-q", "--device", "cpu"]) == 0
    assert seen[1].init is None and seen[1].lr == 5e-5  # the shipped captioner, SCST defaults
    # --init belongs to --scst: cross-entropy training refuses it before loading anything
    assert main(["train", "captioner", "--data", str(tmp_path), "--init", "x.pt", "--device", "cpu"]) == 2
    assert "--init only applies to --scst" in capsys.readouterr().err


def test_sentence_bleu_is_exact_for_a_reference_and_smoothed_otherwise():
    refs = {"a": [ptb_tokenize("a dog runs on the grass"), ptb_tokenize("a brown dog is running")]}
    sb = SentenceBleu(refs)
    assert sb.score("a", ptb_tokenize("A dog runs on the grass.")) == pytest.approx(1.0)
    # 4/4 words, 3/3 bigrams, 1/2 trigrams, 0/1 four-grams; add-one smoothing from bigrams on;
    # the closest reference has 5 words, so the brevity penalty is exp(1 - 5/4)
    want = math.exp((math.log(4 / 4) + math.log(4 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4 + 1 - 5 / 4)
    assert sb.score("a", ptb_tokenize("a dog is running")) == pytest.approx(want)
    assert sb.score("a", ptb_tokenize("a dog is running")) > sb.score("a", ptb_tokenize("a cat sleeps")) > 0
    assert sb.score("a", []) == 0.0 and sb.score("a", ptb_tokenize("zebras")) == 0.0
    # an exact match is exact in the corpus BLEU too
    assert bleu(refs, {"a": ptb_tokenize("a dog runs on the grass")})[3] == pytest.approx(1.0)


def test_reward_adds_weighted_bleu_to_cider():
    only_cider = CaptionReward(REFS)
    mixed = CaptionReward(REFS, bleu_weight=0.5)
    hyp = ptb_tokenize("a dog runs in the park")
    c = CiderD(REFS).score("a", hyp)
    assert only_cider.scores(["a"], [hyp]) == [pytest.approx(c)]
    assert mixed.scores(["a"], [hyp]) == [pytest.approx(c + 0.5 * SentenceBleu(REFS).score("a", hyp))]
    with pytest.raises(ValueError):
        CaptionReward(REFS, bleu_weight=-1)


@pytest.mark.parametrize("bad", [{"n_samples": 1}, {"epochs": 0}, {"lr": 0.0}, {"bleu_weight": -0.1},
                                 {"max_minutes": 0.0}])
def test_scst_config_refuses_settings_that_cannot_train(bad, tmp_path: Path):
    from retrieval.errors import InputError

    cfg = ScstConfig(data=tmp_path, out=tmp_path / "x.pt", cache_dir=tmp_path, **bad)
    with pytest.raises(InputError):
        cfg.check()
    ScstConfig(data=tmp_path, out=tmp_path / "x.pt", cache_dir=tmp_path).check()  # the defaults are fine
