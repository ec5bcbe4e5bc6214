"""RHO-LOSS and baseline selection: pure selection rules, the scoring pass, the selective module, the IL store."""
from datamatters.selection.il_store import ILTable, load_irreducible_losses, save_irreducible_losses
from datamatters.selection.module import SelectiveModule
from datamatters.selection.rules import RULES, Selection, get_rule, n_select

__all__ = ["ILTable", "RULES", "Selection", "SelectiveModule", "get_rule", "load_irreducible_losses", "n_select",
           "save_irreducible_losses"]
