"""cryorecon: ab-initio cryo-EM reconstruction (Punjani, Brubaker & Fleet, TPAMI 2017)."""

__version__ = "0.1.0"
