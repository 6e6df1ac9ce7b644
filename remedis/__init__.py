"""remedis: REMEDIS-style medical-imaging adaptation.

Stages, data flowing one way: data -> pretrain -> adapt -> evaluate -> serving (see README)."""

__version__ = "0.1.0"
