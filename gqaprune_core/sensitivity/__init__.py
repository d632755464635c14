"""Predict quality before cutting: sensitivity profiles, a schedule predictor, an optimized
schedule and a quality gate.

    profile  (profile.py)  per layer and part, the calibration loss increase when only that
                           layer is cut, at a grid of MLP rates and each whole number of groups
             (grams.py)    its Gram matrices, made one layer at a time
             (cuts.py)     one layer's grid of cuts and their local output changes
             (probe.py)    the joint probe: every layer cut at once, how single-layer losses
                           compound
    store    (store.py)    the profile as JSON under cache/sensitivity/, keyed like the layer
                           scores, shared by CLI and app
    predict  (predict.py)  a whole schedule's loss from the profile (additive in the layers,
                           scaled by the probe's compounding factor), with an uncertainty
    optimize (optimize.py) per layer, the MLP channels and GQA groups that minimise the
                           predicted loss at exactly the requested parameter budget
    gate     (gate.py)     the largest ratio whose measured perplexity stays within a gate
    app_view (app_view.py) plain values for the app's pages (no streamlit here)
"""
