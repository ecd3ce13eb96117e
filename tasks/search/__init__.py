"""Architecture and hyper-parameter search: space, objective, study, worker, tracking, report."""
