"""Scoring and decisions: metrics, labelled test sets and the results folder, your own images, thresholds from
good images, tiles, panels and the report, and the accuracy gate that scores an export against its checkpoint."""
