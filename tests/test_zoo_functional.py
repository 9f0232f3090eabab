"""Zoo models whose hot layers reach fast rules through subclasses and functional calls
(fastcurv/layers/functional.py), flattened batches and broadcast position embeddings: small configs
of OPT, HF GPT-2, Llama, Mistral, Qwen2, Gemma, Phi, T5's layer norm, BART's encoder embeddings,
timm efficientnet_b0 / mobilenetv3_small_100 as built (BatchNormAct2d with its in-place activation, in eval
and train mode), timm ConvNeXt layer scale; each against the
float64 per-example loop with the harness of test_zoo_models.py, and at least 99% of the parameters on
fast rules. ``python tests/test_zoo_functional.py`` prints the per-model table."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_zoo_models import TRAIN, ZooCase, check_case, check_refused, run_case, timm_model, token_ce  # noqa: E402
from thirdparty import import_transformers  # noqa: E402

V, D, T, B = 29, 16, 6, 3


def _causal_lm(kind):
    def build():
        tr = import_transformers()
        common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      max_position_embeddings=32, attn_implementation="eager")
        if kind == "gpt2":
            model = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=2, n_positions=32,
                                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                     attn_implementation="eager"))
        elif kind == "opt":
            model = tr.OPTForCausalLM(tr.OPTConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                                                   ffn_dim=32, max_position_embeddings=32, word_embed_proj_dim=D,
                                                   dropout=0.0, attention_dropout=0.0, attn_implementation="eager"))
        elif kind == "llama":
            model = tr.LlamaForCausalLM(tr.LlamaConfig(**common, num_key_value_heads=2))
        elif kind == "mistral":
            model = tr.MistralForCausalLM(tr.MistralConfig(**common, num_key_value_heads=1))
        elif kind == "qwen2":
            model = tr.Qwen2ForCausalLM(tr.Qwen2Config(**common, num_key_value_heads=2))
        elif kind == "gemma":
            model = tr.GemmaForCausalLM(tr.GemmaConfig(**common, num_key_value_heads=2, head_dim=8))
        elif kind == "phi":
            model = tr.PhiForCausalLM(tr.PhiConfig(**common, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0))
        model.config.use_cache = False
        ids = torch.randint(3, V, (B, T))
        return _LM(model), {"input_ids": ids, "labels": torch.randint(3, V, (B, T))}, token_ce
    return build


class _LM(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels=None):
        return self.model(input_ids=input_ids, use_cache=False)


class _Logits:
    def __init__(self, logits):
        self.logits = logits


class _T5Norms(nn.Module):
    """T5's T5LayerNorm (weight * hidden_states, no mean) between two projections."""

    def __init__(self):
        super().__init__()
        tr = import_transformers()
        from transformers.models.t5.modeling_t5 import T5LayerNorm
        del tr
        self.emb, self.norm, self.head = nn.Embedding(V, D), T5LayerNorm(D), nn.Linear(D, V)

    def forward(self, input_ids, labels=None):
        return _Logits(self.head(self.norm(self.emb(input_ids))))


class _BartEncoderLM(nn.Module):
    """BART's encoder alone (BartScaledWordEmbedding and BartLearnedPositionalEmbedding with offset 2)."""

    def __init__(self):
        super().__init__()
        tr = import_transformers()
        from transformers.models.bart.modeling_bart import BartEncoder
        cfg = tr.BartConfig(vocab_size=V, d_model=D, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=16,
                            pad_token_id=1, scale_embedding=True, attn_implementation="eager")
        self.encoder, self.head = BartEncoder(cfg), nn.Linear(D, V)

    def forward(self, input_ids, labels=None):
        return _Logits(self.head(self.encoder(input_ids=input_ids).last_hidden_state))


def _module_lm(cls):
    def build():
        return cls(), {"input_ids": torch.randint(3, V, (B, T)), "labels": torch.randint(3, V, (B, T))}, token_ce
    return build


CASES = [
    ZooCase("HF OPT (flattened MLP, offset positions)", _causal_lm("opt")),
    ZooCase("HF GPT-2 (Conv1D, position_ids [1, T])", _causal_lm("gpt2")),
    ZooCase("HF Llama (LlamaRMSNorm)", _causal_lm("llama")),
    ZooCase("HF Mistral (MistralRMSNorm)", _causal_lm("mistral")),
    ZooCase("HF Qwen2 (Qwen2RMSNorm)", _causal_lm("qwen2")),
    ZooCase("HF Gemma (1 + w, scaled embedding)", _causal_lm("gemma")),
    ZooCase("HF Phi", _causal_lm("phi")),
    ZooCase("HF T5LayerNorm", _module_lm(_T5Norms)),
    ZooCase("HF BART encoder embeddings", _module_lm(_BartEncoderLM)),
    # as built at full width: BatchNormAct2d (F.batch_norm on its own parameters, then an in-place activation on
    # that result: the site's delta is taken at the batch_norm call's own autograd edge), squeeze-excite
    ZooCase("timm efficientnet_b0 (BatchNormAct2d, in-place SiLU)", timm_model("efficientnet_b0", drop_rate=0.0), TRAIN,
            min_fast=1.0),
    ZooCase("timm tf_efficientnet_b0 (Conv2dSame: TF 'SAME' padding, then F.conv2d)",
            timm_model("tf_efficientnet_b0", drop_rate=0.0), TRAIN, min_fast=1.0),
    ZooCase("timm mobilenetv3_small_100 (BatchNormAct2d, hard-swish)", timm_model("mobilenetv3_small_100", drop_rate=0.0),
            TRAIN, min_fast=1.0, penalty=False),  # torch has no double backward for Hardsigmoid: no penalty gradient at all
    ZooCase("timm convnext_atto (layer scale)", timm_model("convnext_atto", ls_init_value=0.5)),
    # timm vit_tiny with LayerScale: cls_token (torch.cat of its batch expansion) and pos_embed on the root are sites;
    # the penalty's double backward fails in timm's fused CPU SDPA (torch has no derivative of its backward)
    ZooCase("timm vit_tiny (layer scale, cls_token)", timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                                                 embed_dim=16, depth=2, num_heads=2, init_values=0.5),
            penalty=False),
]


def _params():
    return [pytest.param(case, mode, id=f"{case.name.split(' (')[0]}-{mode}") for case in CASES for mode in case.modes]


@pytest.mark.parametrize("case, mode", _params())
def test_zoo_functional_model(case, mode):
    check_case(case, mode)


if __name__ == "__main__":  # the per-model table
    torch.set_num_threads(1)
    for case in CASES:
        for mode in case.modes:
            try:
                if case.refused:
                    print(f"{case.name:46s} {mode:13s} refused: {check_refused(case, mode)[:100]}", flush=True)
                    continue
                print(f"{case.name:46s} {mode:13s} exact, {run_case(case, mode, penalty=False):.4f} on fast rules", flush=True)
            except BaseException as exc:  # noqa: BLE001 - a table, not a test
                print(f"{case.name:46s} {mode:13s} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
