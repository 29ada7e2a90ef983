"""Payments: pricing, the OPG/USD price feed, the session ledger and the settling meter.

Pure and trio-native; the x402 SDK (verify/settle, the 402 challenge) is wired on top of these
by ``x402_gate`` (imported on its own: it pulls in the SDK and web3).
"""

from .ledger import (
    Charge,
    DueSettlement,
    InsufficientBudget,
    LedgerError,
    LedgerFull,
    PayerMismatch,
    Reservation,
    SessionClosed,
    SessionConflict,
    SessionExpiring,
    SessionLedger,
    UnknownSession,
)
from .meter import SettlingMeter
from .price_feed import PriceFeed, PriceUnavailable, coingecko_token_price_url
from .pricing import PricingError, cost_units, record_cost, worst_case_cost

__all__ = [
    "Charge",
    "DueSettlement",
    "InsufficientBudget",
    "LedgerError",
    "LedgerFull",
    "PayerMismatch",
    "PriceFeed",
    "PriceUnavailable",
    "PricingError",
    "Reservation",
    "SessionClosed",
    "SessionConflict",
    "SessionExpiring",
    "SessionLedger",
    "SettlingMeter",
    "UnknownSession",
    "coingecko_token_price_url",
    "cost_units",
    "record_cost",
    "worst_case_cost",
]
