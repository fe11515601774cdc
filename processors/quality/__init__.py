"""Measures of the dataset beyond the paper's protocol: coverage, referee agreement, balanced selection,
decontamination, and the reports, plots and browser that show them. Pure functions over plain rows."""
