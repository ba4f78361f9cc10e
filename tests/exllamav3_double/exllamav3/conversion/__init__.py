"""TEST DOUBLE: conversion (compile, quant_config, optimize_model)."""
