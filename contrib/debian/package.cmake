# contrib/debian/package.cmake - what an installed chatd needs besides its
# binaries, and the Debian package (`make deb`, CPack's DEB generator).
#
# Both `make install` and the package install the production chat.conf
# (contrib/debian/chat.conf.in with the installed plugin and sql/ folders
# filled in), the systemd unit and the sysusers.d file.  With the prefix
# /usr (the package) the config goes to /etc and the unit to
# /lib/systemd/system, as Debian 12 has them; under any other prefix they
# stay below it (<prefix>/etc/chatd, <prefix>/lib/systemd/system), so
# `cmake --install --prefix DIR` never writes outside DIR.
#
# CHAT_DEB=ON (set by `make deb` in its own build folder) adds the docs,
# the Debian changelog and copyright, and the CPack settings.  CPack runs the
# same install rules into its staging folder and builds the .deb with
# dpkg-shlibdeps for the library dependencies.

set(CHAT_PLUGIN_DIR_FULL ${CMAKE_INSTALL_FULL_LIBDIR}/chatd/plugins)
set(CHAT_SQL_DIR_FULL ${CMAKE_INSTALL_FULL_DATADIR}/chatd/sql)
configure_file(${CMAKE_CURRENT_LIST_DIR}/chat.conf.in chat.conf.dist @ONLY)

if(CMAKE_INSTALL_PREFIX STREQUAL "/usr")
  set(CHAT_CONF_DEST ${CMAKE_INSTALL_FULL_SYSCONFDIR}/chatd)   # /etc/chatd
  set(CHAT_UNIT_DEST /lib/systemd/system)
else()
  set(CHAT_CONF_DEST ${CMAKE_INSTALL_SYSCONFDIR}/chatd)
  set(CHAT_UNIT_DEST lib/systemd/system)
endif()
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/chat.conf.dist RENAME chat.conf
        DESTINATION ${CHAT_CONF_DEST})

# the unit names /usr/bin/chatd and /etc/chatd/chat.conf: other prefixes
# get their own paths
file(READ ${PROJECT_SOURCE_DIR}/contrib/systemd/chatd.service _unit)
string(REPLACE "/usr/bin/chatd" "${CMAKE_INSTALL_FULL_BINDIR}/chatd" _unit "${_unit}")
string(REPLACE "/etc/chatd/chat.conf" "${CMAKE_INSTALL_FULL_SYSCONFDIR}/chatd/chat.conf"
       _unit "${_unit}")
file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/chatd.service "${_unit}")
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/chatd.service DESTINATION ${CHAT_UNIT_DEST})
install(FILES ${PROJECT_SOURCE_DIR}/contrib/systemd/chatd.sysusers RENAME chatd.conf
        DESTINATION lib/sysusers.d)

if(NOT CHAT_DEB)
  return()
endif()

# docs, compressed as Debian wants them (gzip -9n: reproducible)
set(CHAT_DEB_DOCS README.md docs/operations.md docs/plugins.md docs/protocol.md
    docs/architecture.md)
set(_gz "")
foreach(doc ${CHAT_DEB_DOCS} contrib/debian/changelog contrib/debian/chatd.8
            contrib/debian/chat-cli.1)
  get_filename_component(_name ${doc} NAME)
  set(_out ${CMAKE_CURRENT_BINARY_DIR}/debdoc/${_name}.gz)
  add_custom_command(OUTPUT ${_out}
    COMMAND ${CMAKE_COMMAND} -E make_directory ${CMAKE_CURRENT_BINARY_DIR}/debdoc
    COMMAND sh -c "gzip -9n -c '${PROJECT_SOURCE_DIR}/${doc}' > '${_out}'"
    DEPENDS ${PROJECT_SOURCE_DIR}/${doc} VERBATIM)
  list(APPEND _gz ${_out})
endforeach()
add_custom_target(chat_deb_docs ALL DEPENDS ${_gz})
install(FILES ${_gz} ${PROJECT_SOURCE_DIR}/contrib/debian/copyright
        DESTINATION ${CMAKE_INSTALL_DOCDIR})
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/debdoc/chatd.8.gz
        DESTINATION ${CMAKE_INSTALL_MANDIR}/man8)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/debdoc/chat-cli.1.gz
        DESTINATION ${CMAKE_INSTALL_MANDIR}/man1)

set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME chatd)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_CONTACT "chatd maintainers <maintainers@users.noreply.r-seed-92242f08.example>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "cluster chat server with plugins")
set(CPACK_PACKAGE_DESCRIPTION
"chatd is a chat server in C: clients keep one TCP connection and exchange
JSON messages (register, login, one-to-one and group chat, offline
messages, friends).  A libuv core loads the business logic as plugins and
reloads them on SIGHUP; nodes share users and messages through Redis and
store them in MariaDB.  This package has chatd, its plugins, chat-cli, the
plugin header and pkg-config file, the schema migrations and a systemd
unit.")
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION net)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_DEPENDS "adduser")
set(CPACK_DEBIAN_PACKAGE_RECOMMENDS "mariadb-server, redis-server")
set(CPACK_DEBIAN_PACKAGE_HOMEPAGE "https://example.invalid/chatd")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
  ${PROJECT_SOURCE_DIR}/contrib/debian/conffiles
  ${PROJECT_SOURCE_DIR}/contrib/debian/postinst
  ${PROJECT_SOURCE_DIR}/contrib/debian/prerm
  ${PROJECT_SOURCE_DIR}/contrib/debian/postrm)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION TRUE)
set(CPACK_STRIP_FILES TRUE)
set(CPACK_PACKAGE_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR}/package)
include(CPack)
