# `cmake --install BUILD --prefix PREFIX` lays flexgrad out for other CMake projects:
#   PREFIX/lib/libflexgrad.so*                        the library (CUDA kernels embedded: no source tree needed)
#   PREFIX/include/flexgrad/flexgrad.h                the umbrella header
#   PREFIX/include/flexgrad/<folder>/*.h              the public headers, as the build tree spells them
#   PREFIX/lib/cmake/flexgrad/flexgrad-config.cmake   find_package(flexgrad CONFIG) -> flexgrad::flexgrad
# Included from CMakeLists.txt after the flexgrad target is defined.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS flexgrad EXPORT flexgrad-targets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})  # the include directory comes from $<INSTALL_INTERFACE:include>

# Headers: every header directly in a library folder (public API and the kernel-family headers it includes)
# and in attention/gallery/, plus the toolkit-free CUDA API. The backends' folders (cpu/, cuda/) and the NVRTC
# templates are internal.
install(FILES ${CMAKE_CURRENT_SOURCE_DIR}/flexgrad.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/flexgrad)
foreach(dir ${FG_LIBRARY_FOLDERS} attention/gallery)
  file(GLOB fg_headers CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/${dir}/*.h)
  install(FILES ${fg_headers} DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/flexgrad/${dir})
endforeach()
install(FILES ${CMAKE_CURRENT_SOURCE_DIR}/tensor/cuda/cuda_api.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/flexgrad/tensor/cuda)

set(FG_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/flexgrad)
install(EXPORT flexgrad-targets NAMESPACE flexgrad:: FILE flexgrad-targets.cmake DESTINATION ${FG_CMAKE_DIR})
configure_package_config_file(${CMAKE_CURRENT_SOURCE_DIR}/cmake/flexgrad-config.cmake.in
                              ${CMAKE_CURRENT_BINARY_DIR}/flexgrad-config.cmake INSTALL_DESTINATION ${FG_CMAKE_DIR})
# 0.x: a minor release may change the API, so only the same major.minor satisfies a request.
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/flexgrad-config-version.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/flexgrad-config.cmake ${CMAKE_CURRENT_BINARY_DIR}/flexgrad-config-version.cmake
        DESTINATION ${FG_CMAKE_DIR})

# The test of all the above: install into a temporary prefix, move it, build and run examples/consumer against
# it (scripts/test_install.sh). A sanitized build is skipped: its library needs the sanitizer runtime that a
# plain consumer does not link.
if(NOT FLEXGRAD_SANITIZE)
  add_test(NAME install_consumer
           COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/scripts/test_install.sh ${CMAKE_CURRENT_BINARY_DIR} ${CMAKE_CXX_COMPILER})
  set_tests_properties(install_consumer PROPERTIES TIMEOUT 600 ENVIRONMENT "OMP_NUM_THREADS=2"
                       PASS_REGULAR_EXPRESSION "flexgrad consumer: ok")
endif()
