"""Generated protobuf package root for pixart.*"""
