"""Protos and stubs for the tests only (see deviceplugin_pre_cdi.proto)."""
