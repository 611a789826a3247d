"""The foundation every other layer stands on: the typed config (`config`), the one error family
(`errors`), what the user sees on the console (`progress`), the run folder's checkpoint and atomic
writes (`checkpoint`), ``--set`` overrides (`overrides`) and privlora's accountant (`accountants`).
Imports nothing from the rest of privlora."""
