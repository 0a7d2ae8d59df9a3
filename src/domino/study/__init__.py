"""The evidence study: does DOMINO's data beat prompt tuning's? (`study.py`, docs/study.md)."""
