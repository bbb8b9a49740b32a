import torch

from ddaepp.transport import euler_sample, guided_velocity, interpolate, sample_t, shifted_timesteps, velocity_loss


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


def test_euler_with_the_exact_velocity_lands_on_the_data():
    x1 = torch.randn(3, 2, 4, 4)

    def oracle(x, t, y):  # the straight-line velocity towards x1
        return (x1 - x) / (1 - t.view(-1, 1, 1, 1))

    out = euler_sample(oracle, torch.randn_like(x1), steps=20, shift=0.3)
    assert torch.allclose(out, x1, atol=1e-4)


class CountingModel:
    """cond output = 1 everywhere, null-label output = 0: guidance is visible per channel."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        return (y != 10).float().view(-1, 1, 1, 1).expand_as(x).clone()


def test_cfg_guides_the_chosen_channels_inside_the_interval_only():
    x, y = torch.zeros(2, 4, 2, 2), torch.tensor([1, 2])
    model = CountingModel()
    v = guided_velocity(model, x, torch.full((2,), 0.5), y, 10, scale=3.0, interval_start=0.3, guided_channels=3)
    assert torch.all(v[:, :3] == 3.0) and torch.all(v[:, 3:] == 1.0) and model.calls == 1
    v = guided_velocity(model, x, torch.full((2,), 0.2), y, 10, scale=3.0, interval_start=0.3, guided_channels=None)
    assert torch.all(v == 1.0) and model.calls == 2  # outside: one conditional pass, no null pass
    v = guided_velocity(model, x, torch.full((2,), 0.5), y, 10, scale=3.0, interval_start=0.3, guided_channels=None)
    assert torch.all(v == 3.0)
