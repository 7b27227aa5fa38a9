"""Direct feedback learners (issue 4): DFA, sDFA, DRTP, shallow, DDTP-linear, DDTP-RHL."""
