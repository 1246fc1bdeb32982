//! testsuite (skeleton).
