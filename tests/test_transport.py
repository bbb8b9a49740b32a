import pytest
import torch

from ddaepp.transport import euler_sample, interpolate, sample_t, shifted_timesteps, velocity_loss


def test_shifted_timesteps_run_from_noise_to_data():
    t = shifted_timesteps(11, 0.3)
    assert t[0] == 0 and t[-1] == 1 and torch.all(t[1:] > t[:-1])
    assert torch.allclose(shifted_timesteps(11, 1.0), torch.linspace(0, 1, 11))
    assert t[5] < 0.5  # shift < 1 spends more of the path near the noise end


def test_interpolation_ends_and_target():
    x1, x0 = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    xt, v = interpolate(x1, x0, torch.tensor([1.0, 0.0, 0.5, 0.25]))
    assert torch.equal(xt[0], x1[0]) and torch.equal(xt[1], x0[1])
    assert torch.allclose(xt[2], (x1[2] + x0[2]) / 2) and torch.equal(v, x1 - x0)


def test_velocity_loss():
    target = torch.randn(5, 4, 3, 3)
    assert torch.allclose(velocity_loss(target, target), torch.zeros(5), atol=1e-6)
    # opposite direction: MSE of 2x plus a cosine term of 2 at every position
    loss = velocity_loss(-target, target, cosine=True)
    mse = (2 * target).pow(2).flatten(1).mean(1)
    assert torch.allclose(loss, mse + 2, atol=1e-5)
    assert torch.allclose(velocity_loss(-target, target, cosine=False), mse)


def test_logit_normal_t_in_unit_interval_and_seeded():
    a = sample_t(1000, 0.0, 1.0, torch.Generator().manual_seed(1))
    b = sample_t(1000, 0.0, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.min() > 0 and a.max() < 1 and abs(a.mean() - 0.5) < 0.03


def test_logit_normal_t_is_the_sigmoid_of_a_scaled_shifted_normal():
    t = sample_t(4000, -0.4, 1.7, torch.Generator().manual_seed(2))
    assert torch.equal(t, torch.sigmoid(torch.randn(4000, generator=torch.Generator().manual_seed(2)) * 1.7 - 0.4))
    logit = torch.logit(t.double())
    assert abs(float(logit.mean()) + 0.4) < 0.06 and abs(float(logit.std()) - 1.7) < 0.06


def test_velocity_loss_is_mse_plus_channel_cosine_on_unrelated_velocities():
    pred, target = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    mse = ((pred - target) ** 2).flatten(1).mean(1)
    cosine = (pred * target).sum(1) / (pred.norm(dim=1) * target.norm(dim=1))  # over channels, per position
    assert torch.allclose(velocity_loss(pred, target), mse + (1 - cosine).flatten(1).mean(1), atol=1e-6)
    assert torch.allclose(velocity_loss(pred.half(), target.half(), cosine=False), mse, atol=1e-2)
    assert velocity_loss(pred.half(), target).dtype == torch.float32


def test_euler_with_the_exact_velocity_lands_on_the_data():
    x1 = torch.randn(3, 2, 4, 4)

    def oracle(x, t, y):  # the straight-line velocity towards x1
        return (x1 - x) / (1 - t.view(-1, 1, 1, 1))

    out = euler_sample(oracle, torch.randn_like(x1), steps=20, shift=0.3)
    assert torch.allclose(out, x1, atol=1e-4)


def test_shifted_timesteps_equal_upstreams_float32_grid():
    # LightningDiT: th.linspace(0, 1, n), then each point mapped by s t / (1 + (s - 1) t) in float32
    grid = torch.linspace(0, 1, 250)
    upstream = torch.stack([0.3 * t / (1 + (0.3 - 1) * t) for t in grid])
    assert torch.equal(shifted_timesteps(250, 0.3), upstream)


class GuidanceRecorder:
    """cond output = 1 everywhere, null-label output = 0, so guidance is visible per channel;
    records how the sampler calls it. forward_with_cfg follows upstream's semantics."""

    null = 10

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append(("forward", len(x)))
        return (y != self.null).float().view(-1, 1, 1, 1).expand_as(x).clone()

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval=None, cfg_interval_start=None, *, guided_channels=3):
        self.calls.append(("cfg", len(x), cfg_scale, cfg_interval, cfg_interval_start, guided_channels))
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, y)
        n = out.shape[1] if guided_channels is None else guided_channels
        cond, uncond = out[:, :n].chunk(2)
        mixed = uncond + cfg_scale * (cond - uncond)
        if cfg_interval is True and float(t[0]) < cfg_interval_start:
            mixed = cond
        return torch.cat([torch.cat([mixed, mixed]), out[:, n:]], dim=1)


def test_guided_sampling_calls_forward_with_cfg_on_the_doubled_batch_inside_the_interval_only():
    model, noise, y = GuidanceRecorder(), torch.zeros(2, 4, 2, 2), torch.tensor([1, 2])
    out = euler_sample(model, noise, y, steps=5, shift=1.0, cfg_scale=3.0, interval_start=0.3, guided_channels=3,
                       null_label=10)
    assert out.shape == noise.shape
    # before the interval the conditional batch alone; inside it both halves, upstream's arguments
    # (forward_with_cfg's own forward pass on the doubled batch is recorded after its call)
    assert model.calls == [("forward", 2)] * 2 + [("cfg", 4, 3.0, True, 0.3, 3), ("forward", 4)] * 2
    # t = 0, 0.25 are outside the interval (velocity 1), t = 0.5, 0.75 inside (3 on the guided channels)
    assert torch.allclose(out[:, :3], torch.full_like(out[:, :3], 0.5 * 1 + 0.5 * 3))
    assert torch.allclose(out[:, 3:], torch.ones_like(out[:, 3:]))


def test_scale_one_is_one_plain_pass_per_step():
    model = GuidanceRecorder()
    euler_sample(model, torch.zeros(3, 4, 2, 2), torch.tensor([1, 2, 3]), steps=4, cfg_scale=1.0, null_label=10)
    assert model.calls == [("forward", 3)] * 3


def test_all_channel_guidance():
    model = GuidanceRecorder()
    out = euler_sample(model, torch.zeros(2, 4, 2, 2), torch.tensor([1, 2]), steps=3, shift=1.0, cfg_scale=2.0,
                       interval_start=0.0, guided_channels=None, null_label=10)
    assert torch.allclose(out, torch.full_like(out, 2.0))


def test_rows_per_call_slices_the_batch_evenly_and_counts_the_doubled_batch_twice():
    y = torch.arange(7) % 10
    model = GuidanceRecorder()
    euler_sample(model, torch.zeros(7, 4, 2, 2), y, steps=3, shift=1.0, cfg_scale=1.0, null_label=10, rows_per_call=3)
    assert model.calls == [("forward", 3)] * 2 + [("forward", 2)] * 2 * 2  # 3 + 2 + 2 rows, each slice to the end
    model = GuidanceRecorder()
    out = euler_sample(model, torch.zeros(7, 4, 2, 2), y, steps=2, shift=1.0, cfg_scale=2.0, interval_start=0.0,
                       guided_channels=None, null_label=10, rows_per_call=5)
    assert [call[1] for call in model.calls if call[0] == "cfg"] == [4, 4, 4, 2]  # [x; x] of 2, 2, 2, 1 rows
    assert torch.equal(out, euler_sample(GuidanceRecorder(), torch.zeros(7, 4, 2, 2), y, steps=2, shift=1.0,
                                         cfg_scale=2.0, interval_start=0.0, guided_channels=None, null_label=10))


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_sliced_sampling_equals_the_whole_batch(scale):
    from standins import awake_tiny_dit

    model = awake_tiny_dit()
    noise, y = torch.randn(9, 4, 8, 8), torch.randint(0, 10, (9,))
    args = dict(steps=12, shift=0.3, cfg_scale=scale, interval_start=0.11, guided_channels=3, null_label=10)
    whole = euler_sample(model, noise, y, **args)
    for rows in (1, 4, 9, 18, 50):
        torch.testing.assert_close(euler_sample(model, noise, y, rows_per_call=rows, **args), whole, rtol=0, atol=1e-6)


def test_guidance_without_labels_is_a_clear_error():
    with pytest.raises(ValueError, match="labels"):
        euler_sample(GuidanceRecorder(), torch.zeros(2, 4, 2, 2), None, steps=3, cfg_scale=2.0)


def doubled_batch_sample(model, noise, y, steps, shift, cfg_scale, interval_start, guided_channels, null_label):
    """Upstream's loop: the [cond; null] batch through forward_with_cfg at every step."""
    x, labels = torch.cat([noise, noise]), torch.cat([y, torch.full_like(y, null_label)])
    ts = shifted_timesteps(steps, shift)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        v = model.forward_with_cfg(x, t_cur.expand(len(x)), labels, cfg_scale, cfg_interval=True,
                                   cfg_interval_start=interval_start, guided_channels=guided_channels)
        x = x + (t_next - t_cur) * v.float()
    return x[: len(noise)]


@pytest.mark.parametrize("guided_channels", [None, 3])
def test_interval_skip_equals_the_doubled_batch(guided_channels):
    from standins import awake_tiny_dit

    model = awake_tiny_dit()
    noise, y = torch.randn(6, 4, 8, 8), torch.randint(0, 10, (6,))
    args = dict(steps=12, shift=0.3, cfg_scale=4.0, interval_start=0.11, guided_channels=guided_channels,
                null_label=10)
    assert 0 < int((shifted_timesteps(12, 0.3)[:-1] < 0.11).sum()) < 11  # steps on both sides of the start
    skipped, doubled = euler_sample(model, noise, y, **args), doubled_batch_sample(model, noise, y, **args)
    torch.testing.assert_close(skipped, doubled, rtol=0, atol=1e-6)


def test_the_sampling_loop_reads_nothing_back_per_step():
    from host_syncs import count_host_reads

    from ddaepp.models import LightningDiT

    model = LightningDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                         num_classes=10, use_swiglu=True, use_rope=True, use_rmsnorm=True).eval()
    noise, y = torch.randn(3, 4, 8, 8), torch.randint(0, 10, (3,))
    counts = {}
    for steps in (5, 13):
        with count_host_reads() as counts[steps]:
            for scale in (1.0, 3.0):
                euler_sample(model, noise, y, steps=steps, shift=0.3, cfg_scale=scale, interval_start=0.11,
                             guided_channels=None, null_label=10)
    assert counts[5] == counts[13], counts  # only the grid's host copy before the loop, never per step
