"""crystallm_core: CIF language models as a stand-alone library and CLI.

Kept import-light on purpose: ``import crystallm_core`` pulls neither torch nor pymatgen.
"""

__version__ = "0.1.0"
