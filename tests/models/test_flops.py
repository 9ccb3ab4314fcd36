"""Parameter count and analytic FLOPs against hand counts for a small config."""

from lmtrain.configlib import updated
from lmtrain.models import ModelConfig
from lmtrain.models.flops import count_params, forward_flops_per_token, train_flops_per_token
from lmtrain.models.mixers.attention import mean_context


def test_mean_context_closed_form():
    assert mean_context(4, 10) == (1 + 2 + 3 + 4) / 4
    assert mean_context(6, 2) == (1 + 2 + 3 + 3 + 3 + 3) / 6


def test_hand_count_griffin():
    cfg = updated(ModelConfig(), {"vocab_size": 100, "width": 8, "num_layers": 3, "pattern": "RRA", "mlp_expansion": 3,
                                  "attention.num_heads": 2, "attention.num_kv_heads": 1, "attention.window": 2,
                                  "rglru.num_heads": 2, "rglru.width": 12})
    d, f, lw, h, hd, c, v = 8, 24, 12, 2, 4, 4, 100
    mlp_params = 2 * (d * f + f) + f * d + d
    norms = 2 * d
    r_params = 3 * (d * lw + lw) - lw + d + (c * lw + lw) + lw + 2 * (h * (lw // h) ** 2 + lw)
    a_params = d * h * hd + 2 * d * hd + h * hd * d + d
    assert count_params(cfg) == v * d + d + 2 * (r_params + mlp_params + norms) + a_params + mlp_params + norms
    t = 4
    mlp = 2 * 3 * d * f
    r = 2 * 3 * d * lw + 2 * 2 * lw * lw / h + 2 * c * lw + 2 * lw
    a = 2 * (d * h * hd + 2 * d * hd + h * hd * d) + 4 * h * hd * (1 + 2 + 3 + 3) / 4
    expected = 2 * (r + mlp) + (a + mlp) + 2 * d * v
    assert forward_flops_per_token(cfg, t) == expected
    assert train_flops_per_token(cfg, t) == 3 * expected


def test_hand_count_mamba():
    cfg = updated(ModelConfig(), {"vocab_size": 100, "width": 8, "num_layers": 1, "pattern": "M", "mlp_expansion": 3,
                                  "mamba.expand": 2, "mamba.head_dim": 4, "mamba.state_size": 3,
                                  "mamba.num_groups": 2, "mamba.conv_width": 4})
    d, f, v, i, h, p, g, n, c = 8, 24, 100, 16, 4, 4, 2, 3, 4
    mlp_params = 2 * (d * f + f) + f * d + d
    m_params = (2 * d * i + d * 2 * g * n + d * h  # z, x, (B, C), dt projections (no bias)
                + (c * i + i) + (c * 2 * g * n + 2 * g * n)  # the two convs
                + 3 * h + i  # dt_bias, A_log, D; the gated norm's scale
                + i * d + d)  # output projection
    assert count_params(cfg) == v * d + d + m_params + mlp_params + 2 * d
    mixer = 2 * d * (2 * i + 2 * g * n + h) + 2 * i * d + 2 * c * (i + 2 * g * n) + 4 * h * p * n + 4 * i
    assert forward_flops_per_token(cfg, 16) == mixer + 2 * 3 * d * f + 2 * d * v
