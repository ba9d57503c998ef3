//! Unit tests of the doctor checks: controlled host facts, exact verdicts and fixes.
