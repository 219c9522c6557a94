"""Multiple-instance learning: bag aggregators (``mil.models``) behind one interface."""
