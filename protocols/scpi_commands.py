"""The command vocabulary of the EP analog board: one table that the spec, the emulator and the tests follow.

Each :class:`CommandSpec` names its header in SCPI mnemonic form (upper-case letters are the short form,
``[:NODE]`` is optional), its parameters with units and *static* ranges, what it replies, and the device
errors it may raise beyond the parser's. Ranges that depend on the board (edge and layer indices, vector
lengths, DAC range, compliance) are checked by the instrument and listed in ``protocols/analog_board.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

MAX_SETTLE_STEPS = 1_000_000  # SETT:STEP and SETT:TIME / period
MAX_PHASE_STEPS = 100_000  # t1, t2 of LEARn:SAMPle? and INFer?
MAX_BETA = 10.0  # nudge strength (dimensionless), target mode and local learning
MAX_BIT_LENGTH = 255  # stochastic pulse-train length of PULSe:OUTer
MAX_ETA = 1.0  # local-learning rate per edge
PROTOCOL_VERSION = 2  # SYSTem:PROTocol? (spec preface); the driver refuses any other


@dataclass(frozen=True)
class Param:
    """One parameter: its kind, unit and static range (inclusive; elementwise for blocks)."""

    name: str
    kind: Literal["int", "float", "bool", "choice", "block", "floats"]
    unit: str = ""
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()  # mnemonics, e.g. ("FREE", "NUDGe", "HOLD")
    datatype: str = "f"  # element type of a block: "f" float32 LE, "b" int8
    optional: bool = False


@dataclass(frozen=True)
class CommandSpec:
    """One command of the board."""

    header: str  # e.g. "SYSTem:ERRor[:NEXT]?"
    params: tuple[Param, ...] = ()
    reply: str = ""  # what a query answers; "" for a set command
    summary: str = ""
    errors: tuple[int, ...] = ()  # device-side codes besides the parser's
    changes: bool | None = None  # changes the board (fenced, spec 4.2); None: every set command but connection ones
    variants: tuple[tuple[str, ...], ...] = field(init=False)  # mnemonic node lists the header accepts
    key: str = field(init=False)  # short canonical form without optional nodes: "SYST:ERR?"

    def __post_init__(self) -> None:
        base = self.header.rstrip("?")
        required = re.sub(r"\[[^\]]*\]", "", base).split(":")
        full = base.replace("[", "").replace("]", "").split(":")
        variants = (tuple(required),) if required == full else (tuple(required), tuple(full))
        short = ":".join("".join(c for c in n if c.isupper() or c.isdigit() or c == "*") for n in required)
        object.__setattr__(self, "variants", variants)
        object.__setattr__(self, "key", short + ("?" if self.query else ""))
        if self.changes is None:
            object.__setattr__(self, "changes", not self.query and self.key not in _CONNECTION_SETTINGS)

    @property
    def query(self) -> bool:
        return self.header.endswith("?")


_CONNECTION_SETTINGS = ("*CLS", "*ESE", "*OPC", "SYST:INT")  # per-connection state: never fenced (spec 4.2)


def _edge() -> Param:
    return Param("edge", "int", "", 0, None)


_F32 = "definite-length block, float32 little-endian"
_PHASE_CHOICES = ("FREE", "NUDGe", "HOLD")

COMMANDS: tuple[CommandSpec, ...] = (
    # IEEE 488.2 common commands
    CommandSpec("*IDN?", reply="EQPROP-HIL,ANALOG-EP-1,<serial>,<firmware>", summary="identity, 4 fields"),
    CommandSpec("*RST", summary="states 0, phase HOLD, nudge off, input 0, local learning off; weights kept"),
    CommandSpec("*CLS", summary="clear the error queue and the event status register"),
    CommandSpec("*OPC", summary="set the OPC bit of the event status register once pending operations are done"),
    CommandSpec("*OPC?", reply="1 once every previous command has completed", summary="wait for completion"),
    CommandSpec("*ESR?", reply="NR1 0..255, then cleared", summary="event status register"),
    CommandSpec("*ESE", (Param("mask", "int", "", 0, 255),), summary="event status enable mask"),
    CommandSpec("*ESE?", reply="NR1 0..255", summary="event status enable mask"),
    CommandSpec("*STB?", reply="NR1: bit 2 error queue not empty, bit 5 ESR&ESE != 0", summary="status byte"),
    # system
    CommandSpec("SYSTem:ERRor[:NEXT]?", reply='<code>,"<message>"', summary="oldest error-queue entry (FIFO)"),
    CommandSpec("SYSTem:ERRor:COUNt?", reply="NR1", summary="entries in the error queue"),
    CommandSpec("SYSTem:VERSion?", reply="1999.0", summary="SCPI version"),
    CommandSpec("SYSTem:PROTocol?", reply="NR1 2", summary="revision of this protocol (spec preface)"),
    CommandSpec("SYSTem:INSTance?", reply='string "<16 hex digits>"', summary="instance id drawn at power-up"),
    CommandSpec("SYSTem:REQuest:LAST?", reply="NR1, -1 if none",
                summary="newest request id accepted into the duplicate cache (spec 4.2)"),
    CommandSpec("SYSTem:BOOT?", reply="NR1", summary="boots since manufacture (non-volatile): a change means a power cycle"),
    CommandSpec("SYSTem:DESCribe?", reply="block of UTF-8 JSON", summary="device model, converters, config"),
    CommandSpec("SYSTem:INTegrity", (Param("enabled", "bool"),),
                summary="require a CRC-32 field on every message of this connection (spec section 1.2)"),
    CommandSpec("SYSTem:INTegrity?", reply="1|0", summary="integrity mode of this connection"),
    # topology
    CommandSpec("TOPology:SIZes?", reply="NR1 list, input layer first", summary="neurons per layer"),
    CommandSpec("TOPology:EDGes?", reply="NR1 list src0,dst0,src1,dst1,...", summary="edges, chain then skips"),
    CommandSpec("TOPology:FEEDback?", reply="TIED|UNTIED", summary="feedback kind"),
    CommandSpec("TOPology:ACTivation?", reply="SIGMOID4|HARD_SIGMOID|TANH|IDENTITY", summary="activation"),
    # drive
    CommandSpec("INPut[:VOLTage]", (Param("volts", "block", "V"),), summary="input drive, (n_0,) " + _F32,
                errors=(101, -222)),
    CommandSpec("INPut[:VOLTage]?", reply="block float32 (n_0,) V", summary="input drive as set"),
    CommandSpec("PHASe", (Param("phase", "choice", "", choices=_PHASE_CHOICES),), summary="FREE|NUDGe|HOLD"),
    CommandSpec("PHASe?", reply="FREE|NUDGE|HOLD", summary="current phase"),
    CommandSpec("NUDGe:CURRent", (Param("amperes", "block", "A"),), summary="nudge currents (n_out,), mode CURRENT",
                errors=(101, 110)),
    CommandSpec("NUDGe:CURRent?", reply="block float32 (n_out,) A", summary="nudge currents as set"),
    CommandSpec("NUDGe:COMPliance", (Param("amperes", "float", "A", 1e-9, None),), summary="current compliance",
                errors=(-222, -221)),
    CommandSpec("NUDGe:COMPliance?", reply="NR3 A", summary="current compliance"),
    CommandSpec("NUDGe:TARGet", (Param("beta", "float", "", 0.0, MAX_BETA), Param("target", "block", "V")),
                summary="target mode: board adds beta*(target - o_t) every step", errors=(101, -222)),
    CommandSpec("NUDGe:TARGet?", reply="block float32 (n_out,) V", summary="target as set"),
    CommandSpec("NUDGe:BETA?", reply="NR3", summary="beta of target mode"),
    CommandSpec("NUDGe:MODE?", reply="OFF|CURRENT|TARGET", summary="nudge mode"),
    CommandSpec("NUDGe:OFF", summary="currents 0, leave target mode"),
    CommandSpec("EDGE:GAIN", (_edge(), Param("gain", "float", "", 0.0, 1.0)), summary="feedback gain (FRE)",
                errors=(-222,)),
    CommandSpec("EDGE:GAIN?", (_edge(),), reply="NR3", summary="feedback gain"),
    CommandSpec("EDGE:SCALe", (_edge(), Param("scale", "float", "", 1e-3, 1e3)), summary="weight scale",
                errors=(-222,)),
    CommandSpec("EDGE:SCALe?", (_edge(),), reply="NR3", summary="weight scale"),
    CommandSpec("EDGE:SCALe:FEEDback", (_edge(), Param("scale", "float", "", 1e-3, 1e3)),
                summary="weight scale of B_e", errors=(-221, -222)),
    CommandSpec("EDGE:SCALe:FEEDback?", (_edge(),), reply="NR3", summary="weight scale of B_e", errors=(-221,)),
    # settling
    CommandSpec("SETTle[:STEPs]", (Param("steps", "int", "steps", 1, MAX_SETTLE_STEPS),), summary="run n steps"),
    CommandSpec("SETTle:TIME", (Param("seconds", "float", "s", 0.0, None),), summary="run ceil(t/period) steps",
                errors=(-222,)),
    CommandSpec("SETTle:PERiod?", reply="NR3 s", summary="duration of one step"),
    CommandSpec("SETTle:COUNt?", reply="NR1", summary="steps run since power-on"),
    CommandSpec("STATe?", (Param("layer", "int", "", 0, None, optional=True),), reply="block float32 V",
                summary="neuron states, all layers concatenated or one layer", errors=(-222,)),
    # pulses
    CommandSpec("PULSe:MATRix", (_edge(), Param("counts", "block", "pulses", -127, 127, datatype="b")),
                summary="signed pulse count per device, int8 (n_dst*n_src,)", errors=(101, -222)),
    CommandSpec("PULSe:MATRix:FEEDback", (_edge(), Param("counts", "block", "pulses", -127, 127, datatype="b")),
                summary="pulse counts of B_e, int8 (n_src*n_dst,)", errors=(101, -221, -222)),
    CommandSpec("PULSe:OUTer", (_edge(), Param("bit_length", "int", "bits", 1, MAX_BIT_LENGTH),
                                Param("vectors", "block", "", -1.0, 1.0)),
                summary="rank-1 stochastic trains; block = rows (n_dst) then cols (n_src)", errors=(101, -222)),
    CommandSpec("PULSe:OUTer:FEEDback", (_edge(), Param("bit_length", "int", "bits", 1, MAX_BIT_LENGTH),
                                         Param("vectors", "block", "", -1.0, 1.0)),
                summary="outer update of B_e; rows (n_src) then cols (n_dst)", errors=(101, -221, -222)),
    CommandSpec("PULSe:LAST?", reply="NR1", summary="pulses fired by the last pulse command"),
    CommandSpec("PULSe:TOTal?", reply="NR1", summary="pulses fired since power-on"),
    CommandSpec("PULSe:COUNt?", reply="NR1",
                summary="pulse commands executed since manufacture (non-volatile wear log; survives power cycles)"),
    # local learning
    CommandSpec("LEARn[:STATe]", (Param("enabled", "bool"),), summary="on-device C-EP/C-VF on or off",
                errors=(-221,)),
    CommandSpec("LEARn[:STATe]?", reply="1|0", summary="local learning state"),
    CommandSpec("LEARn:ETA", (Param("eta", "floats", "", 0.0, MAX_ETA),), summary="learning rate per edge",
                errors=(-108, -109)),
    CommandSpec("LEARn:ETA?", reply="NR3 list, one per edge", summary="learning rates"),
    CommandSpec("LEARn:BETA", (Param("beta", "float", "", 0.0, MAX_BETA),), summary="beta of the local rule",
                errors=(-222,)),
    CommandSpec("LEARn:BETA?", reply="NR3", summary="beta of the local rule"),
    CommandSpec("LEARn:SAMPle?", (Param("beta", "float", "", 0.0, MAX_BETA),
                                  Param("t1", "int", "steps", 1, MAX_PHASE_STEPS),
                                  Param("t2", "int", "steps", 1, MAX_PHASE_STEPS),
                                  Param("data", "block", "V")),
                reply="block float32 (n_out,) V: free-phase output", summary="one training sample on the board",
                errors=(101, -221, -222), changes=True),
    CommandSpec("INFer?", (Param("t1", "int", "steps", 1, MAX_PHASE_STEPS), Param("volts", "block", "V")),
                reply="block float32 (n_out,) V", summary="reset, clamp input, t1 free steps", errors=(101, -222),
                changes=True),
    # compound step (spec 3.8)
    CommandSpec("STEP?", (Param("steps", "int", "steps", 0, MAX_SETTLE_STEPS),
                          Param("updates", "block", "", datatype="B")),
                reply="<pulses NR1>,<block float32 states of every layer>",
                summary="apply sparse/outer pulse updates (all or none), settle, read every layer: one pulse command",
                errors=(-161, 101, 102, -221, -222), changes=True),
    # weights
    CommandSpec("WEIGht?", (_edge(),), reply="block float32 (n_dst*n_src,)", summary="effective weights W_e",
                errors=(-222,)),
    CommandSpec("WEIGht:FEEDback?", (_edge(),), reply="block float32 (n_src*n_dst,)", summary="B_e",
                errors=(-221, -222)),
    CommandSpec("WEIGht:PROGram", (_edge(), Param("tolerance", "float", "", 1e-6, 1.0),
                                   Param("iterations", "int", "", 1, 1000), Param("weights", "block")),
                summary="write-verify W_e", errors=(101, -222)),
    CommandSpec("WEIGht:PROGram:FEEDback", (_edge(), Param("tolerance", "float", "", 1e-6, 1.0),
                                            Param("iterations", "int", "", 1, 1000), Param("weights", "block")),
                summary="write-verify B_e", errors=(101, -221, -222)),
    CommandSpec("WEIGht:RESidual?", reply="NR3", summary="max |W - target| of the last programming"),
    # device and converters
    CommandSpec("DEVice:MODel?", reply="IDEAL|CONSTANT|SOFT_BOUNDS|POWER", summary="synapse device model"),
    CommandSpec("CONVerter:DAC?", reply="bits,lo,hi (bits 0 = unquantised)", summary="input DAC"),
    CommandSpec("CONVerter:ADC?", reply="bits,lo,hi (bits 0 = unquantised)", summary="state ADC"),
)

BY_KEY: dict[str, CommandSpec] = {spec.key: spec for spec in COMMANDS}
