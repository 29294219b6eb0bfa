"""Quantised expert rows: formats (fp8, int8/4/3/2, MXFP4), the calibration-free fit, bit packing, and the byte
layout of one quantised expert row (:class:`~moeflow.quant.row.RowCodec`). Pure torch, any device; no engine state.
"""
