import torch

from vmaescale.train.ema import WeightEma


def test_ema_update_follows_its_formula_and_swaps_in_and_out():
    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = WeightEma(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.state_dict()["weight"], 0.9 * start["weight"] + 0.1 * (start["weight"] + 1))
    torch.testing.assert_close(ema.state_dict()["bias"], start["bias"])
    saved = ema.swap_into(model)
    torch.testing.assert_close(model.weight.detach(), ema.state_dict()["weight"])
    model.load_state_dict(saved)
    torch.testing.assert_close(model.weight.detach(), start["weight"] + 1)
