"""mm1.py's Llama decoder vs transformers' LlamaForCausalLM: one training step each (a benchmark, not a test).

    python -m kernels.bench_decoder                     # cpu preset sizes of mm1.py
    python -m kernels.bench_decoder --preset=smoke      # any mm1.py --key=value works

Same config, weights and batch for both; median of 5 steps (forward, fp32 loss, backward, AdamW) after 2
warm-up steps; ours runs before and after transformers' (less order bias). Run from the repo root.
"""

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mm1
from data.tokenizer import get_tokenizer


def bench_decoder(cfg, repeats=5):
    """Median seconds per training step of our decoder and transformers', and their ratio."""
    vocab = get_tokenizer().n_vocab
    ours = mm1.MM1(mm1.arch_of(cfg, vocab, image_token_id=-1))
    text = mm1.arch_of(cfg, vocab, -1)["text"]
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=cfg.n_embd,
            intermediate_size=cfg.ffn_hidden,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head,
            rms_norm_eps=text["rms_norm_eps"],
            rope_theta=cfg.rope_theta,
            max_position_embeddings=cfg.seq_len,
            tie_word_embeddings=False,
        )
    )
    hf.load_state_dict({k: v for k, v in ours.state_dict().items() if k.startswith(("model.", "lm_head."))})
    ids = torch.randint(
        0, vocab, (cfg.batch_size, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0)
    )

    def step_ours():
        logits, _ = ours(ids[:, :-1])
        (mm1.lm_loss_sum(logits, ids[:, 1:]) / ids[:, 1:].numel()).backward()

    def step_hf():
        hf(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss.backward()  # HF shifts the labels itself

    times = {}
    for name, model, fn in (
        ("ours", ours, step_ours),
        ("transformers", hf, step_hf),
        ("ours_again", ours, step_ours),
    ):
        params = [p for n, p in model.named_parameters() if not n.startswith(("vision_model.", "connector."))]
        opt = torch.optim.AdamW(params, lr=1e-4)
        samples = []
        for _ in range(repeats + 2):  # 2 warm-up steps
            t = time.perf_counter()
            fn()
            opt.step()
            opt.zero_grad(set_to_none=True)
            samples.append(time.perf_counter() - t)
        times[name] = sorted(samples[2:])[repeats // 2]
    ours_t, hf_t = min(times["ours"], times["ours_again"]), times["transformers"]
    tokens = cfg.batch_size * cfg.seq_len
    print(
        f"decoder training step, batch {cfg.batch_size} x {cfg.seq_len}, "
        f"{cfg.n_layer} layers x {cfg.n_embd}, "
        f"{torch.get_num_threads()} threads:\n| impl | ms / step | tok/s |\n| --- | --- | --- |\n"
        f"| mm1.py | {1000 * ours_t:.0f} | {tokens / ours_t:.0f} |\n"
        f"| transformers LlamaForCausalLM | {1000 * hf_t:.0f} | {tokens / hf_t:.0f} |\n"
        f"speed ratio (transformers time / ours): {hf_t / ours_t:.2f}"
    )
    return dict(ours_s=ours_t, transformers_s=hf_t, ratio=hf_t / ours_t)


if __name__ == "__main__":
    mm1.run_main(lambda argv: bench_decoder(mm1.parse_config(argv)))
