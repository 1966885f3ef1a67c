"""The temperature: a fixed number or tensor, or CLIP's learnable log-parametrised logit scale.

Accepted everywhere a temperature is taken (the functions, the constructors and
``module.temperature = ...``), as info-nce-pytorch accepts them: a Python or NumPy
real number (``0.2``, ``np.float32(0.2)``, ``np.float64(0.2)``), or a floating-point
tensor with one element (shape ``()``, ``(1,)``, ...). A tensor receives its gradient,
in its own shape. The losses use the inverse ``1 / temperature`` as a 0-dim tensor in
the accumulation dtype (float32, float64 for float64 inputs).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from dist_infonce.kernels import compute_dtype
from dist_infonce.losses.learnable import AveragesOwnGradients

__all__ = ["MAX_LOGIT_SCALE", "Temperature", "TemperatureModule", "clamped_scale",
           "inverse_temperature", "scalar_value", "temperature_value"]  # fmt: skip

#: A float, an int, a NumPy real scalar, or a one-element floating-point tensor.
Temperature = float | torch.Tensor
#: CLIP's cap on the learnable logit scale 1 / temperature.
MAX_LOGIT_SCALE = 100.0


def scalar_value(name: str, value: object, *, positive: bool) -> float:
    """``value`` as a Python float, checked (one host sync for a tensor): the temperature
    here, SigLIP's scale and bias (:mod:`dist_infonce.losses.siglip`).

    Raises:
        ValueError: naming ``name``, for anything but a real number (bool excluded) or a
            one-element floating-point tensor, or a value that is not finite (and, with
            ``positive``, not > 0).
    """
    need = "a positive finite" if positive else "a finite"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(
                f"{name} must be {need} float or a one-element floating-point tensor, got a "
                f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        v = float(value.detach().reshape(()))  # a bad value is worse than a sync
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        # numbers.Real: int, float, NumPy's integer and floating scalars (not np.bool_).
        v = float(value)
    else:
        raise ValueError(
            f"{name} must be {need} float (a Python or NumPy number) or a one-element "
            f"floating-point tensor, got {type(value).__name__}"
        )
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} must be {'> 0 and ' if positive else ''}finite, got {v}")
    return v


def temperature_value(temperature: object) -> float:
    """The temperature as a Python float, checked (one host sync for a tensor).

    Raises:
        ValueError: naming ``temperature``, for anything but a real number (bool
            excluded) or a one-element floating-point tensor, or a value that is not
            positive and finite.
    """
    return scalar_value("temperature", temperature, positive=True)


def inverse_temperature(temperature: Any, like: torch.Tensor) -> torch.Tensor:
    """``1 / temperature`` as a 0-dim tensor in ``like``'s accumulation dtype and device.

    A tensor temperature stays in the graph (its gradient comes back in its shape).
    Shape: ().
    """
    dt = compute_dtype(like.dtype)
    if isinstance(temperature, torch.Tensor):
        return (1.0 / temperature.reshape(())).to(device=like.device, dtype=dt)
    return torch.tensor(1.0 / float(temperature), dtype=dt, device=like.device)


class TemperatureModule(AveragesOwnGradients):
    """Base of :class:`~dist_infonce.InfoNCE` and :class:`~dist_infonce.NTXent`: the temperature.

    Fixed (``learn_temperature=False``): the number or tensor given, re-checked at every
    call; a tensor receives its gradient. A plain tensor stays the user's (not registered:
    ``.to()`` / ``.double()`` of the module leave it alone; nothing here averages it, e.g.
    it comes out of their DDP model). An ``nn.Parameter`` is registered, as
    info-nce-pytorch's module registers it, and is then the module's own: averaged over
    the ranks like the learnable temperature below.

    Learnable: the parameter ``logit_scale = log(1 / temperature)`` (a multiplicative
    parametrisation keeps the temperature positive and its steps scale-free), clamped
    in the forward to ``1 / temperature <= 100`` (CLIP). Its gradient is averaged over
    the ranks of ``group`` by the module itself when no DDP forward owns it
    (:mod:`dist_infonce.losses.learnable`).

    ``module.temperature`` reads the temperature of the next forward: as given when
    fixed (a float stays a float, as in info-nce-pytorch), ``1 / clamped logit scale`` as
    a 0-dim tensor when learnable. Assigning a number or one-element tensor sets it
    (schedules do so). With
    ``learn_temperature=True`` assigning writes ``log(1 / value)`` into ``logit_scale``
    in place: the optimizer keeps the same parameter and its state, the value of a
    tensor is read once (not tracked), and the forward clamps as above.
    """

    def __init__(self, temperature: Temperature, *, learn_temperature: bool) -> None:
        super().__init__()
        value = temperature_value(temperature)
        self.learn_temperature = learn_temperature
        if learn_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / value)))
            self._temperature: Temperature | None = None
        else:
            self._set_fixed(temperature if isinstance(temperature, torch.Tensor) else value)

    def _set_fixed(self, value: Temperature) -> None:
        # Registered only when it is an nn.Parameter (see the class doc); any slot the
        # previous value held goes first (nn.Module refuses a float in a parameter slot).
        self._parameters.pop("_temperature", None)
        self.__dict__.pop("_temperature", None)
        if isinstance(value, nn.Parameter):
            self.register_parameter("_temperature", value)
        else:
            object.__setattr__(self, "_temperature", value)

    def self_averaged_parameters(self) -> list[nn.Parameter]:
        """The learnable logit scale, or a registered ``nn.Parameter`` temperature."""
        if self.learn_temperature:
            return [self.logit_scale]
        t = self._temperature
        return [t] if isinstance(t, nn.Parameter) and t.requires_grad else []

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "temperature":
            # nn.Module would try to register an nn.Parameter under this name (and
            # fail: the property exists); every assignment goes to the setter.
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    @property
    def temperature(self) -> Temperature:
        """The temperature of the next forward: as given when fixed, a 0-dim tensor when learnable."""
        if self.learn_temperature:
            return 1.0 / clamped_scale(self.logit_scale)
        return self._temperature  # type: ignore[return-value]

    @temperature.setter
    def temperature(self, value: Temperature) -> None:
        v = temperature_value(value)
        if self.learn_temperature:
            with torch.no_grad():
                self.logit_scale.fill_(math.log(1.0 / v))
        else:
            self._set_fixed(value if isinstance(value, torch.Tensor) else v)

    def inverse_temperature(self, like: torch.Tensor) -> torch.Tensor:
        """1 / temperature for this forward. Shape: (); ``like``'s accumulation dtype."""
        if self.learn_temperature:
            (log_scale,) = self.rank_averaged(self.logit_scale, device=like.device)
            return clamped_scale(log_scale).to(dtype=compute_dtype(like.dtype))
        temperature_value(self._temperature)  # a user-owned tensor may have changed
        own = self.self_averaged_parameters()
        if own:
            (t,) = self.rank_averaged(*own, device=like.device)
            return inverse_temperature(t, like)
        return inverse_temperature(self._temperature, like)

    def _temperature_repr(self) -> str:
        return (
            f"temperature={float(torch.as_tensor(self.temperature).detach()):.4g}, "
            f"learn_temperature={self.learn_temperature}"
        )


def clamped_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """``exp(log_scale)`` clamped at :data:`MAX_LOGIT_SCALE` in the forward (CLIP's cap;
    OpenCLIP clamps the parameter after each step): past 100 the gradient stops pushing.
    The learnable temperature's logit scale and SigLIP's t."""
    return log_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()
